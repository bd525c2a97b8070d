"""A `trust_remote_code` entry point written into every compressed checkpoint.

Tools that load models by name and cannot be told to `import optimum_oats` first (the stock `lm_eval` command
line, `pipeline(...)`, serving scripts) can load a compressed checkpoint with `trust_remote_code=True`: the
checkpoint's `modeling_oats.py` imports the plugin (which registers the "oats" method) and subclasses the stock
architecture unchanged. Without `trust_remote_code`, transformers uses its own class and needs the plugin
imported by hand, as documented.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .auto_classes import model_task

MODULE_NAME = "modeling_oats"

_TEMPLATE = '''"""Loads this OATS-compressed checkpoint with `trust_remote_code=True` (written by optimum-oats)."""

try:
    import optimum_oats  # noqa: F401  (registers the "oats" quantization method with transformers)
except ImportError as error:
    raise ImportError(
        "This checkpoint is compressed with OATS (sparse + low-rank layers): install the plugin with "
        "`pip install optimum-oats`."
    ) from error

from transformers import {base} as _Base
from transformers import {config_base} as _ConfigBase


class {config_name}(_ConfigBase):
    """`{config_base}`, resolved through `trust_remote_code` so the plugin is imported before anything reads the
    `quantization_config` (lm-eval parses it before loading the model)."""


class {name}(_Base):
    """`{base}` whose compressed layers are rebuilt by optimum-oats while loading."""

    config_class = {config_name}
'''


def _stock_name(cls: type) -> str:
    """The first stock transformers class in the MRO (a model loaded through this entry point is a subclass)."""
    stock = next((c for c in cls.__mro__ if c.__module__.startswith("transformers.models.")), None)
    return stock.__name__ if stock is not None else ""


def write_remote_code(model: nn.Module, directory: str | os.PathLike) -> None:
    """Add `modeling_oats.py` and the matching `auto_map` entry to a checkpoint folder being written."""
    base, config_base = _stock_name(type(model)), _stock_name(type(model.config))
    # The Auto class transformers itself maps this architecture to (causal LM, seq2seq, classifier, ViT, ...);
    # architectures no Auto class loads get no remote-code entry point.
    task = model_task(base, getattr(model.config, "model_type", None))
    if task is None or not config_base:
        return
    auto_class = task.auto_class
    directory = Path(directory)
    name, config_name = f"OATS{base}", f"OATS{config_base}"
    code = _TEMPLATE.format(base=base, name=name, config_base=config_base, config_name=config_name)
    (directory / f"{MODULE_NAME}.py").write_text(code, encoding="utf-8")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoConfig": f"{MODULE_NAME}.{config_name}", auto_class: f"{MODULE_NAME}.{name}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
