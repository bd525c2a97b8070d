"""Transformers integration: registration under `"oats"`, marking a model as compressed, and the
`from_pretrained(oats_config=...)` / atomic `save_pretrained` conveniences.

Everything that touches transformers internals lives in this folder, so a transformers upgrade has one place to be
checked.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..config import QUANT_METHOD, OATSConfig
from ..engine.loop import CompressionOutcome
from ..engine.report import LAYER_STATS_ATTR, CompressionReport
from ..utils.files import staged_directory
from .quantizer import OATSHfQuantizer, settings_of
from .remote_code import write_remote_code

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

_PATCHED = "__optimum_oats_patched__"
# Writers run on the staging folder of every `save_pretrained` of a compressed model: `hook(model, staging, target)`.
# Higher levels add theirs (the model card, `optimum_oats.hub.autocard`), so this module needs none of them.
SAVE_HOOKS: list = []


def mark_compressed(model: nn.Module, config: OATSConfig, outcome: CompressionOutcome) -> None:
    """Mark `model` as OATS-compressed the way transformers marks quantized models, so it saves and reloads."""
    settings = settings_of(config, outcome)
    model.config.quantization_config = settings
    model.hf_quantizer = OATSHfQuantizer(settings, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = settings.quant_method
    setattr(model, LAYER_STATS_ATTR, dict(outcome.layer_stats))


def is_oats_model(model: nn.Module) -> bool:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return isinstance(config, OATSConfig)


def _patch_save_pretrained(cls: type) -> None:
    original = cls.save_pretrained

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        if not is_oats_model(self):
            return original(self, save_directory, *args, push_to_hub=push_to_hub, **kwargs)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "token") if k in kwargs}
        with staged_directory(save_directory) as staging:
            original(self, staging, *args, **kwargs)
            CompressionReport.from_model(self).save(staging)
            write_remote_code(self, staging)
            for hook in SAVE_HOOKS:
                hook(self, staging, Path(save_directory))
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

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(OATSConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(OATSHfQuantizer)
    if not getattr(PreTrainedModel.from_pretrained.__func__, _PATCHED, False):
        _patch_from_pretrained(PreTrainedModel)
    if not getattr(PreTrainedModel.save_pretrained, _PATCHED, False):
        _patch_save_pretrained(PreTrainedModel)
