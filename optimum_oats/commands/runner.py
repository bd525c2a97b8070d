"""Run one `oats` command: set up logging, call its `run(args) -> dict`, print the JSON summary as the last line.

Failures a user can fix (bad argument, missing file or data, Hub refusal) end with a JSON summary
`{"ok": false, "error": ...}` and exit status 1 instead of a traceback; anything else is a bug and propagates.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

COMMANDS = ("compress", "evaluate", "push", "build_kernels")


def _user_errors() -> tuple[type[BaseException], ...]:
    from optimum_oats.hub.publish import PublishError

    return (PublishError, ValueError, OSError)


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
    return summary


def resolve_model_source(name: str) -> str:
    """`default` is the embedded SmolLM2-135M-Instruct (converted on first use); anything else passes through."""
    if name == "default":
        from optimum_oats.integrations.default_model import default_model_path

        return default_model_path()
    return name


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
