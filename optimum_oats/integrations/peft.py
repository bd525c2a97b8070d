"""Move the low-rank part of an OATS model in and out of PEFT's LoRA adapter format.

`W ≈ S + U V` is exactly a LoRA layer over a sparse base: the base weight is S (zeros where pruned), `lora_B = U`,
`lora_A = V`, and `lora_alpha = r` makes PEFT's scaling `alpha / r` equal to 1. So:

- [`to_peft_model`] builds a `PeftModel` (base = S as plain `nn.Linear`, adapter = U, V) that computes the same
  logits; [`export_lora`] saves it as a normal transformers checkpoint plus a LoRA adapter folder, which every
  LoRA-serving stack can load (`PeftModel.from_pretrained(base, adapter)`, `merge_and_unload()`, vLLM, TGI...).
- [`from_peft_model`] goes back: every LoRA layer becomes a [`LinearSparseLowRank`] whose mask is the base
  weight's zero pattern, so a base + adapter (e.g. after PEFT fine-tuning, see `training/recovery.py`) saves
  compactly again.

Layers of rank 0 (plain pruned layers) have no adapter; they stay `nn.Linear` with zeros in the base, and
`from_peft_model(..., sparse_modules=...)` can compact them too.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import OATSConfig
from ..engine.blocks import set_module
from ..engine.loop import CompressionOutcome
from ..nn import LinearSparseLowRank
from ..utils.counting import counted_parameters
from .transformers import mark_compressed

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

BASE_SUBFOLDER = "base"
ADAPTER_SUBFOLDER = "adapter"


def _compressed_layers(model: nn.Module) -> dict[str, LinearSparseLowRank]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LinearSparseLowRank)}


def lora_config_for(model: nn.Module, **lora_kwargs: Any):
    """The `LoraConfig` whose per-layer rank equals each compressed layer's rank and whose scaling is 1.

    Extra keyword arguments (e.g. `lora_dropout`) are passed to `LoraConfig`.
    """
    from peft import LoraConfig

    ranks = {name: layer.rank for name, layer in _compressed_layers(model).items() if layer.rank > 0}
    if not ranks:
        raise ValueError("The model has no compressed layer with a low-rank term (rank > 0); there is no LoRA part.")
    default = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank, so most keys are implicit
    # Full, regex-escaped module names: `layers.1.` can never match `layers.10.` (PEFT matches keys as regexes).
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != default}
    return LoraConfig(
        r=default,
        lora_alpha=default,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        lora_dropout=lora_kwargs.pop("lora_dropout", 0.0),
        bias="none",
        task_type=lora_kwargs.pop("task_type", "CAUSAL_LM"),
        **lora_kwargs,
    )


def sparse_base_model(model: PreTrainedModel) -> PreTrainedModel:
    """A deep copy of `model` with each compressed layer replaced by `nn.Linear` holding S only (dense storage)."""
    if not _compressed_layers(model):
        raise ValueError("The model has no `LinearSparseLowRank` layer; compress it first (`optimum_oats.compress`).")
    base = copy.deepcopy(model)
    for name, layer in _compressed_layers(base).items():
        set_module(base, name, layer.to_linear(include_low_rank=False))
    _drop_quantization(base)
    return base


def _drop_quantization(model: nn.Module) -> None:
    """Make `model` a plain transformers model again (its layers are all dense)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method


def to_peft_model(model: PreTrainedModel, adapter_name: str = "default", **lora_kwargs: Any) -> PeftModel:
    """A `PeftModel` computing the same function as the OATS `model`: base = S, LoRA = (U, V), scaling 1.

    The input model is not modified. Train the result with PEFT as usual (the base, hence the mask, is frozen),
    then call [`from_peft_model`] to get a compact OATS model back.
    """
    from peft import get_peft_model

    config = lora_config_for(model, **lora_kwargs)
    factors = {
        name: (layer.lowrank_u.detach(), layer.lowrank_v.detach())
        for name, layer in _compressed_layers(model).items()
        if layer.rank > 0
    }
    peft_model = get_peft_model(sparse_base_model(model), config, adapter_name=adapter_name)
    modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, (lowrank_u, lowrank_v) in factors.items():
            lora_layer = modules[name]
            if lora_layer.r[adapter_name] != lowrank_u.shape[1] or lora_layer.scaling[adapter_name] != 1.0:
                raise RuntimeError(
                    f"PEFT built `{name}` with rank {lora_layer.r[adapter_name]} and scaling "
                    f"{lora_layer.scaling[adapter_name]}, expected rank {lowrank_u.shape[1]} and scaling 1."
                )
            lora_layer.lora_B[adapter_name].weight.copy_(lowrank_u)
            lora_layer.lora_A[adapter_name].weight.copy_(lowrank_v)
    return peft_model


def export_lora(model: PreTrainedModel, save_directory: str | os.PathLike, tokenizer=None) -> tuple[Path, Path]:
    """Save `model` as `<dir>/base` (a normal dense-storage checkpoint of S) and `<dir>/adapter` (a LoRA adapter).

    Returns `(base_dir, adapter_dir)`. Reload with
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)`.

    Example:
    ```python
    >>> base_dir, adapter_dir = export_lora(oats_model, "smollm2-oats-lora", tokenizer)
    >>> base = AutoModelForCausalLM.from_pretrained(base_dir)
    >>> model = PeftModel.from_pretrained(base, adapter_dir)  # same logits as `oats_model`
    ```
    """
    save_directory = Path(save_directory)
    base_dir, adapter_dir = save_directory / BASE_SUBFOLDER, save_directory / ADAPTER_SUBFOLDER
    # Save the plain base before PEFT wraps its layers (PEFT modifies the model it is given in place).
    sparse_base_model(model).save_pretrained(base_dir)
    to_peft_model(model).save_pretrained(adapter_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(base_dir)
        tokenizer.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def from_peft_model(
    peft_model: PeftModel, config: OATSConfig | None = None, sparse_modules: list[str] | tuple[str, ...] = ()
) -> PreTrainedModel:
    """Fold a LoRA `PeftModel` over a sparse base into a compact OATS model (one adapter, active).

    Each LoRA layer becomes a [`LinearSparseLowRank`] with S = the base weight (its zero pattern is the mask),
    `U = lora_B · scaling`, `V = lora_A`. Layers named in `sparse_modules` that carry no adapter become rank-0
    compressed layers. The result has an `OATSConfig` (yours, or one describing what is kept) with its
    `layer_map`, so `save_pretrained` writes the compact format and `from_pretrained` reloads it.

    Args:
        peft_model (`PeftModel`): a LoRA model; merged or multi-adapter models are not supported.
        config ([`OATSConfig`], *optional*): recorded as the model's `quantization_config`.
        sparse_modules (`list[str]`, *optional*): extra dense layers (with zeros) to store compactly.
    """
    from peft.tuners.lora import LoraLayer

    adapters = list(peft_model.peft_config)
    if len(adapters) != 1:
        raise NotImplementedError(f"Exactly one adapter is supported, the model has {adapters}.")
    adapter = adapters[0]
    model = peft_model.base_model.model
    layer_map: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if not isinstance(module, LoraLayer):
                continue
            if getattr(module, "merged", False) or module.use_dora.get(adapter, False):
                raise NotImplementedError(f"`{name}` is merged or uses DoRA; unmerge it / use plain LoRA.")
            base = module.get_base_layer()
            lowrank_u = module.lora_B[adapter].weight * module.scaling[adapter]
            lowrank_v = module.lora_A[adapter].weight
            layer = LinearSparseLowRank.from_linear(base, base.weight.detach(), lowrank_u, lowrank_v)
            set_module(model, name, layer)
            layer_map[name] = {"rank": layer.rank, "nnz": layer.sparse_nnz}
        modules = dict(model.named_modules())
        for name in sparse_modules:
            linear = modules.get(name)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"`sparse_modules` names `{name}`, which is not a linear layer without adapter.")
            layer = LinearSparseLowRank.from_linear(linear, linear.weight.detach())
            set_module(model, name, layer)
            layer_map[name] = {"rank": 0, "nnz": layer.sparse_nnz}
    config = _describe(model, layer_map) if config is None else config
    mark_compressed(model, config, CompressionOutcome(layer_map=layer_map))
    return model


def _describe(model: nn.Module, layer_map: dict[str, dict[str, Any]]) -> OATSConfig:
    """An `OATSConfig` whose rate and κ are the ones actually kept (for the report and the model card)."""
    layers = [layer for name, layer in _compressed_layers(model).items() if name in layer_map]
    dense = sum(layer.in_features * layer.out_features for layer in layers)
    kept = sum(layer.num_parameters for layer in layers)
    lowrank = sum(counted_parameters(0, layer.rank, layer.in_features, layer.out_features) for layer in layers)
    rate = min(max(1.0 - kept / dense, 1e-6), 1 - 1e-6)
    return OATSConfig(compression_rate=round(rate, 6), rank_ratio=round(lowrank / max(kept, 1), 6))


def load_lora(base: str | os.PathLike | PreTrainedModel, adapter: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """Load a base checkpoint + LoRA adapter straight into the compact OATS format ([`from_peft_model`])."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not isinstance(base, nn.Module):
        base = AutoModelForCausalLM.from_pretrained(base)
    return from_peft_model(PeftModel.from_pretrained(base, str(adapter)), **kwargs)
