"""Transformers integration: registration under `"oats"`, layer swapping, and the `from_pretrained` /
`save_pretrained` conveniences.

Everything that touches transformers internals lives here (and in `quantizer.py`), so a transformers upgrade
has one place to be checked.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .config import QUANT_METHOD, OATSConfig
from .nn import LinearSparseLowRank

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

_PATCHED = "__optimum_oats_patched__"


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule `name` (dotted path) of `root` by `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def replace_with_skeletons(model: PreTrainedModel, config: OATSConfig) -> dict[str, tuple[int, int]]:
    """Swap each layer named in `config.layer_map` for an empty `LinearSparseLowRank` of the recorded shape.

    Runs before weights load (on the meta device under `from_pretrained`), so the checkpoint's compact
    tensors land directly in the right places. Returns `{module: (in_features, out_features)}`.
    """
    if not config.layer_map:
        raise ValueError(
            "This checkpoint's `quantization_config` has no `layer_map`, so its compressed layers cannot be "
            "rebuilt. It was not written by `optimum_oats` (or was edited); re-run the compression."
        )
    modules = dict(model.named_modules())
    shapes = {}
    for name, entry in config.layer_map.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"The checkpoint's `layer_map` names `{name}`, which is not a linear layer of "
                f"{type(model).__name__} (found {type(linear).__name__ if linear is not None else 'nothing'}). "
                "The checkpoint and its config.json disagree."
            )
        skeleton = LinearSparseLowRank.skeleton_of(linear, entry["rank"], entry["nnz"])
        set_module(model, name, skeleton)
        shapes[name] = (linear.in_features, linear.out_features)
    return shapes


def checkpoint_key_renamer(model: PreTrainedModel):
    """`key on disk -> parameter name` as transformers renames checkpoint keys while loading `model`.

    transformers 5 renames some architectures' modules and converts keys both ways (ViT stores
    `attention.attention.key` but its module is `attention.k_proj`), so a check of the checkpoint's tensors
    against `layer_map` (module names) must rename the stored keys first. Identity when nothing is renamed.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers without key conversion: keys are stored as named
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    if not transforms:
        return lambda key: key
    return lambda key: rename_source_key(key, renamings, converters)[0]


def replace_with_dense(model: PreTrainedModel) -> PreTrainedModel:
    """Merge every `LinearSparseLowRank` back to a dense `nn.Linear` (`S + U V`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearSparseLowRank):
            set_module(model, name, module.to_linear())
    return model


def is_oats_model(model: nn.Module) -> bool:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return isinstance(config, OATSConfig)


@contextmanager
def staged_directory(target: str | os.PathLike):
    """Yield a temporary sibling folder; on success move its files into `target`, config files last.

    A failure while writing (full disk, serialization error, interrupt) leaves `target` exactly as it was and
    removes the staging folder. A new `target` appears in one atomic rename. Into an existing folder, its old
    `config.json` is removed before any other file is replaced and the new one lands last, so even a failure
    while moving never leaves a mix of old and new files that loads as a checkpoint.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not `mkdtemp`: its 0700 mode would become the saved folder's mode after the final rename.
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        if not target.exists():
            os.replace(staging, target)
            return
        staged = sorted(staging.iterdir(), key=lambda p: p.name == "config.json")
        names = {p.name for p in staged}
        (target / "config.json").unlink(missing_ok=True)
        for stale in target.glob("model*.safetensors*"):
            if stale.name not in names:
                stale.unlink()
        for path in staged:
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _patch_save_pretrained(cls: type) -> None:
    original = cls.save_pretrained

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        if not is_oats_model(self):
            return original(self, save_directory, *args, push_to_hub=push_to_hub, **kwargs)
        from .remote_code import write_remote_code
        from .report import CompressionReport

        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "token") if k in kwargs}
        with staged_directory(save_directory) as staging:
            original(self, staging, *args, **kwargs)
            CompressionReport.from_model(self).save(staging)
            write_remote_code(self, staging)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            self.push_to_hub(repo_id, **hub_kwargs)

    setattr(save_pretrained, _PATCHED, True)
    cls.save_pretrained = save_pretrained


def _patch_from_pretrained(cls: type) -> None:
    original = cls.from_pretrained.__func__

    @functools.wraps(original)
    def from_pretrained(cls, *args, oats_config: OATSConfig | None = None, **kwargs):
        if oats_config is not None:
            if kwargs.get("quantization_config") is not None:
                raise ValueError("Pass either `oats_config` or `quantization_config` to `from_pretrained`, not both.")
            kwargs["quantization_config"] = oats_config
        return original(cls, *args, **kwargs)

    setattr(from_pretrained, _PATCHED, True)
    cls.from_pretrained = classmethod(from_pretrained)


def register() -> None:
    """Register `OATSConfig` and `OATSHfQuantizer` under `"oats"`; safe to call any number of times."""
    from transformers import PreTrainedModel
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from .quantizer import OATSHfQuantizer

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(OATSConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(OATSHfQuantizer)
    if not getattr(PreTrainedModel.from_pretrained.__func__, _PATCHED, False):
        _patch_from_pretrained(PreTrainedModel)
    if not getattr(PreTrainedModel.save_pretrained, _PATCHED, False):
        _patch_save_pretrained(PreTrainedModel)
