"""Transformers integration: registration under `"oats"`, marking a model as compressed, and the
`from_pretrained(oats_config=...)` / atomic `save_pretrained` patches.

Everything that touches transformers internals lives in this folder, so a transformers upgrade has one place to be
checked; the patches are listed in `patches.py` (with how to opt out of each).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from torch import nn

from ..config import QUANT_METHOD, OATSConfig
from ..engine.loop import CompressionOutcome
from ..engine.report import LAYER_STATS_ATTR, CompressionReport
from ..utils.files import staged_directory
from .integrity import RECORD_KEY, VERIFY_OVERRIDE, encode_record, record_of_tensors, write_records
from .patching import Patch
from .quantizer import OATSHfQuantizer, settings_of
from .remote_code import write_remote_code

logger = logging.getLogger(__name__)

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


def _wrap_save_pretrained(original: Callable) -> Callable:
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        if not is_oats_model(self):
            return original(self, save_directory, *args, push_to_hub=push_to_hub, **kwargs)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "create_pr", "token") if k in kwargs}
        with staged_directory(save_directory) as staging:
            with _records_in_saved_shards():
                original(self, staging, *args, **kwargs)
            write_records(staging, missing_only=True)  # a shard the hook missed (another transformers version)
            CompressionReport.from_model(self).save(staging)
            write_remote_code(self, staging)
            for hook in SAVE_HOOKS:
                hook(self, staging, Path(save_directory))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            self.push_to_hub(repo_id, **hub_kwargs)

    return save_pretrained


@contextlib.contextmanager
def _records_in_saved_shards() -> Iterator[None]:
    """While a compressed model saves, every shard transformers writes gets its integrity record in its metadata,
    hashed from the very tensors handed to safetensors (after transformers' renames and tied-weight removal), so
    no file is read back or rewritten. Where transformers writes differently, `write_records` does it after.
    (Another thread saving during this call would get records too, which is harmless.)"""
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_save_file", None)
    if original is None:
        yield
        return

    def save_with_record(tensors, filename, metadata=None, *args, **kwargs):
        record = record_of_tensors(tensors)
        if record is not None:
            metadata = {**(metadata or {}), RECORD_KEY: encode_record(record)}
        return original(tensors, filename, metadata, *args, **kwargs)

    modeling_utils.safe_save_file = save_with_record
    try:
        yield
    finally:
        modeling_utils.safe_save_file = original


def _wrap_from_pretrained(original: Callable) -> Callable:
    @functools.wraps(original)
    def from_pretrained(cls, *args, oats_config: OATSConfig | None = None, oats_verify: bool | None = None, **kwargs):
        if oats_config is not None:
            if kwargs.get("quantization_config") is not None:
                raise ValueError("Pass either `oats_config` or `quantization_config` to `from_pretrained`, not both.")
            kwargs["quantization_config"] = oats_config
        if oats_verify is not None and not isinstance(oats_verify, bool):
            raise TypeError(f"`oats_verify` must be True, False or None, got {type(oats_verify).__name__}.")
        token = VERIFY_OVERRIDE.set(oats_verify)  # read by the quantizer while this call loads the checkpoint
        try:
            return original(cls, *args, **kwargs)
        finally:
            VERIFY_OVERRIDE.reset(token)

    return from_pretrained


SAVE_PRETRAINED = Patch(
    name="save_pretrained",
    attribute="save_pretrained",
    owners=("transformers.PreTrainedModel",),
    wrap=_wrap_save_pretrained,
    signatures={
        "transformers.PreTrainedModel.save_pretrained": (
            "(self, save_directory, is_main_process=True, state_dict=None, push_to_hub=False, "
            "max_shard_size='50GB', variant=None, token=None, save_peft_format=True, save_original_format=True, "
            "distributed_checkpoint=False, **kwargs)"
        ),
        # Wrapped for the duration of our save only, to record each shard (`_records_in_saved_shards`).
        "transformers.modeling_utils.safe_save_file": "(tensors, filename, metadata=None)",
    },
    effect=(
        "a compressed model saves into a staged folder moved into place whole, with `oats_report.json`, "
        "`modeling_oats.py`, the OATS model card and an integrity record in each safetensors file; without it, "
        "transformers writes the weights and config only (they load with a warning that they cannot be verified)"
    ),
)
FROM_PRETRAINED = Patch(
    name="from_pretrained",
    attribute="from_pretrained",
    owners=("transformers.PreTrainedModel",),
    wrap=_wrap_from_pretrained,
    signatures={
        "transformers.PreTrainedModel.from_pretrained": (
            "(cls, pretrained_model_name_or_path, *model_args, config=None, cache_dir=None, "
            "ignore_mismatched_sizes=False, force_download=False, local_files_only=False, token=None, "
            "revision='main', use_safetensors=None, weights_only=True, fusion_config=None, disable_mmap=None, "
            "**kwargs)"
        ),
    },
    effect=(
        "`from_pretrained(oats_config=...)` as a spelling of `quantization_config=`, and `oats_verify=False` to skip "
        "the integrity records of one load; without it, only the former's long spelling and `OATS_VERIFY_CHECKPOINTS`"
    ),
)


def register() -> None:
    """Register `OATSConfig` and `OATSHfQuantizer` under `"oats"`; safe to call any number of times."""
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
