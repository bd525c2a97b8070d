"""Swapping target linears for `LoSparseLinear` before training, and exporting to the compact OATS format after."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ...config import OATSConfig
from ...engine.blocks import find_linear_layers, find_main_block_stack, set_module
from ...engine.loop import CompressionOutcome
from ...integrations.transformers import mark_compressed
from ...utils.counting import counted_parameters
from .config import LoSparseConfig
from .layer import LoSparseLinear, losparse_rank

logger = logging.getLogger(__name__)


def losparse_layers(model: nn.Module) -> dict[str, LoSparseLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoSparseLinear)}


def apply_losparse(model: nn.Module, config: LoSparseConfig) -> dict[str, int]:
    """Replace each target linear of `model`'s repeated blocks by a [`LoSparseLinear`] (in place).

    The model computes the same function afterwards (`U V + S = W`). Returns `{module: rank}`.
    """
    if losparse_layers(model):
        raise ValueError("The model already has LoSparse layers; `apply_losparse` must be called once.")
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ValueError("The model is already quantized or compressed; apply LoSparse to the dense model.")
    blocks_name, blocks = find_main_block_stack(model)
    ranks = {}
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}"
        for name, linear in find_linear_layers(block, prefix).items():
            if not config.selects(name):
                continue
            rank = losparse_rank(linear.out_features, linear.in_features, config.low_rank_ratio)
            set_module(model, name, LoSparseLinear.from_linear(linear, rank))
            ranks[name] = rank
    if not ranks:
        raise ValueError(
            f"No linear layer matched `target_modules={config.target_modules}` / "
            f"`modules_to_not_convert={config.modules_to_not_convert}`."
        )
    logger.info("LoSparse: %d layers substituted", len(ranks))
    return ranks


def export_losparse(model: nn.Module, config: OATSConfig | None = None) -> nn.Module:
    """Turn every trained [`LoSparseLinear`] into a compact `LinearSparseLowRank` (in place); returns `model`.

    Only the kept rows' values of S are stored (plus the 1-bit mask), beside U and V, so the saved checkpoint is
    really smaller, and `config.quantization_config` (an `OATSConfig` with `method="losparse"` and the
    `layer_map`) lets `AutoModelForCausalLM.from_pretrained(dir)` rebuild it like any OATS checkpoint.
    """
    layers = losparse_layers(model)
    if not layers:
        raise ValueError("The model has no LoSparse layer; call `apply_losparse` and train it first.")
    dense = sum(layer.in_features * layer.out_features for layer in layers.values())
    entries: dict[str, dict[str, Any]] = {}
    kept = lowrank = 0
    for name, layer in layers.items():
        compact = layer.to_compact()
        set_module(model, name, compact)
        entries[name] = {"rank": compact.rank, "nnz": compact.sparse_nnz, "kept_rows": layer.kept_rows}
        kept += compact.num_parameters
        lowrank += counted_parameters(0, compact.rank, compact.in_features, compact.out_features)
    if kept >= dense:
        raise ValueError(
            f"The LoSparse layers keep {kept} of {dense} parameters, so nothing is compressed: train with "
            "`LoSparseCallback` (which prunes rows of S) before exporting."
        )
    if config is None:
        config = OATSConfig(method="losparse", compression_rate=round(1 - kept / dense, 6), rank_ratio=lowrank / kept)
    mark_compressed(model, config, CompressionOutcome.from_entries(entries))
    return model
