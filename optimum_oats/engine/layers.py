"""One block's linear layers → compact layers: the hop from calibration statistics into the algorithm registry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..algorithms import ALGORITHMS, INPUT_NORMS, compress_layer, layer_budget
from ..config import OATSConfig
from ..nn import LinearSparseLowRank
from .distributed import assign_layers, share_layers, world
from .guards import check_finite_weight

# What a compressed layer's entry holds beyond its shape; reloading needs only `rank` and `nnz` (the layer map).
LayerEntry = dict[str, Any]


def statistics_needed(method: str) -> tuple[str, ...]:
    """What the block loop collects for `method`: its own statistics, plus the input norms that every layer's
    reported error is measured in (the same D-scaled norm for every method)."""
    return tuple(dict.fromkeys((*ALGORITHMS[method].statistics, INPUT_NORMS)))


def relative_error(weight: torch.Tensor, approx: torch.Tensor, input_norms: torch.Tensor | None) -> float:
    """`||(W - Ŵ) D||_F / ||W D||_F`, the output-space error OATS minimises (plain Frobenius without D)."""
    weight = weight.float()
    scale = input_norms.float() if input_norms is not None else torch.ones(weight.shape[1], device=weight.device)
    return float(((weight - approx.float()) * scale).norm() / (weight * scale).norm().clamp_min(1e-30))


@torch.no_grad()
def compress_linear(
    linear: nn.Linear, statistics: dict[str, torch.Tensor], config: OATSConfig, compression_rate: float | None = None
) -> tuple[LinearSparseLowRank, LayerEntry]:
    """Compress one layer at `compression_rate` (default: the config's); returns it and its entry
    (`rank`, `nnz`, then the per-layer numbers of the report: `relative_error`, `compression_rate`)."""
    algorithm = ALGORITHMS[config.method]
    rate = config.compression_rate if compression_rate is None else compression_rate
    d_out, d_in = linear.weight.shape
    budget = layer_budget(d_out, d_in, rate, config.effective_rank_ratio, config.nm)
    decomposition = compress_layer(algorithm, linear.weight, statistics, budget, config)
    layer = LinearSparseLowRank.from_linear(
        linear,
        decomposition.sparse,
        decomposition.lowrank_u,
        decomposition.lowrank_v,
        scales=(decomposition.value_scales, decomposition.lowrank_u_scales, decomposition.lowrank_v_scales),
        **storage_settings(config),
    )
    error = relative_error(linear.weight, layer.to_dense(), statistics.get(INPUT_NORMS))
    entry: LayerEntry = {"rank": layer.rank, "nnz": layer.sparse_nnz, **layer_storage(layer)}
    entry["relative_error"] = round(error, 6)
    if config.nm is None:
        entry["compression_rate"] = round(rate, 6)
    return layer, entry


def storage_settings(config: OATSConfig) -> dict[str, int]:
    """The layer constructor's storage arguments for `config` (empty when nothing is quantized)."""
    if not config.quantized:
        return {}
    return {"value_bits": config.value_bits, "lowrank_bits": config.lowrank_bits, "group_size": config.group_size}


def layer_storage(layer: LinearSparseLowRank) -> dict[str, int]:
    """What a quantized layer's `layer_map` entry records beyond its shape, so its skeleton can be rebuilt (and
    `in_features`, which `oats verify` otherwise reads from `lowrank_v`, not stored when quantized); empty for a
    layer stored as floats (its entry stays as before quantization existed)."""
    if layer.value_spec is None and layer.lowrank_spec is None:
        return {}
    storage = {"value_bits": layer.value_bits, "lowrank_bits": layer.lowrank_bits, "group_size": layer.group_size}
    return {**storage, "in_features": layer.in_features}


def compress_block(
    prefix: str,
    linears: dict[str, nn.Linear],
    accumulators: dict[str, dict],
    config: OATSConfig,
    compression_rate: float | None = None,
) -> dict[str, tuple[LinearSparseLowRank, LayerEntry]]:
    """Compress a block's layers from their collected statistics: `{name: (layer, entry)}` in order.

    Under `torch.distributed` each rank computes its share of the layers and receives the others' results.
    """
    rank, world_size = world()
    shapes = {name: tuple(linear.weight.shape) for name, linear in linears.items()}
    owners = assign_layers(shapes, world_size) if world_size > 1 else None
    results = {}
    for name, linear in linears.items():
        statistics = {stat: acc.finalize() for stat, acc in accumulators[name].items()}
        check_finite_weight(f"{prefix}.{name}", linear.weight)
        check_statistics(f"{prefix}.{name}", statistics)
        if owners is None or owners[name] == rank:
            try:
                results[name] = compress_linear(linear, statistics, config, compression_rate)
            except ValueError as error:  # the algorithms cannot know the layer's name; the user needs it
                raise ValueError(f"`{prefix}.{name}` ({config.method}): {error}") from error
    return share_layers(linears, owners, results) if owners is not None else results


def check_statistics(name: str, statistics: dict[str, torch.Tensor]) -> None:
    for stat, value in statistics.items():
        if not torch.isfinite(value).all():
            raise ValueError(
                f"Calibration statistic {stat!r} of `{name}` is not finite (NaN/Inf activations). "
                "Check the model in float32 and the calibration data."
            )
