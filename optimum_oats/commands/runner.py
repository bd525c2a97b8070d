"""Run one `oats` command: set up logging, call its `run(args) -> dict`, print the JSON summary as the last line.

Failures a user can fix (bad argument, missing file or data, Hub refusal, a model or combination not supported
yet) end with a JSON summary `{"ok": false, "error": ...}` and exit status 1 instead of a traceback; anything else
is a bug and propagates.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMMANDS = ("compress", "evaluate", "push", "build_kernels", "verify")


def _user_errors() -> tuple[type[BaseException], ...]:
    from optimum_oats.hub.publish import PublishError

    # NotImplementedError: an architecture or combination not supported yet (`UnsupportedArchitectureError`)
    return (PublishError, ValueError, OSError, NotImplementedError)


def configure_logging() -> None:
    """INFO from optimum_oats on stderr; stdout stays for the tables and the JSON summary."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("optimum_oats").setLevel(logging.INFO)


def emit(summary: dict[str, Any]) -> None:
    """Print the summary as one JSON line on stdout (the last line a command prints)."""
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
    sys.stdout.flush()


def execute(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run command `name` with parsed `args`; returns its summary (also printed)."""
    if name not in COMMANDS:
        raise ValueError(f"Unknown oats command {name!r}; expected one of {COMMANDS}.")
    configure_logging()
    module = importlib.import_module(f"optimum_oats.commands.{name}")
    try:
        summary = {"command": name, "ok": True, **module.run(args)}
    except _user_errors() as err:
        logger.error("%s failed: %s", name, err)
        emit({"command": name, "ok": False, "error": f"{type(err).__name__}: {err}"})
        raise SystemExit(1) from err
    emit(summary)
    if not summary["ok"]:  # a command that ran but found a problem (`verify` on a damaged checkpoint)
        raise SystemExit(1)
    return summary


def resolve_model_source(name: str) -> str:
    """`default` is the embedded SmolLM2-135M-Instruct (converted on first use); anything else passes through,
    except a local path that does not exist (which transformers would report as a malformed Hub repo id)."""
    if name == "default":
        from optimum_oats.integrations.default_model import default_model_path

        return default_model_path()
    if _is_local_path(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"Model path {name!r} does not exist (resolved to {Path(name).expanduser().resolve()}). Give the folder "
            "of a saved model, or a Hub id such as 'HuggingFaceTB/SmolLM2-135M'."
        )
    return name


def _is_local_path(name: str) -> bool:
    """A Hub id is `name` or `namespace/name`; anything else shaped like a path can only be a local one."""
    if name in (".", "..") or "\\" in name:
        return True
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: str, dtype: str, device: str | None):
    """Tokenizer and model (dense or OATS checkpoint) from `name`, on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model.to(resolve_device(device)).eval(), tokenizer
