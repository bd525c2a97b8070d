"""The methods this package knows, and what each needs: the single list the config, CLI and model card read.

A one-shot method is `run(weight, statistics, budget, settings) -> Decomposition`, a pure tensor function; the
engine collects only the calibration statistics it declares. Training-time methods (LoSparse) are listed too, so
that their checkpoints validate and their cards name them, but have no `run`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .budget import LayerBudget
from .hessian_slr import default_shrinkage, hessian_metric, quantized_hessian_sparse_low_rank
from .oats import Decomposition, oats_decompose
from .pruning import magnitude_prune, wanda_prune
from .quantize import NOT_QUANTIZED, GroupSpec, quantize_rtn
from .sparsegpt import sparsegpt_prune, sparsegpt_prune_quantized

# Calibration statistics an algorithm may ask for; the engine collects only these.
INPUT_NORMS = "input_norms"
HESSIAN = "hessian"


class RunSettings(Protocol):
    """The solver settings an algorithm may read; `OATSConfig` has them, and this package need not import it."""

    num_iterations: int
    svd: str
    hessian_iterations: int
    hessian_shrinkage: float | None
    value_bits: int
    group_size: int
    lowrank_bits: int


def value_spec(settings: RunSettings) -> GroupSpec | None:
    """The grid of S's kept values (zero-free: the mask carries the zeros), or None when they are not quantized."""
    bits = getattr(settings, "value_bits", NOT_QUANTIZED)
    return None if bits == NOT_QUANTIZED else GroupSpec(bits, settings.group_size)


def lowrank_spec(settings: RunSettings) -> GroupSpec | None:
    """The grid of U and V (with a zero level: they are dense), or None when they are not quantized."""
    bits = getattr(settings, "lowrank_bits", NOT_QUANTIZED)
    return None if bits == NOT_QUANTIZED else GroupSpec(bits, settings.group_size, zero_level=True)


Run = Callable[[torch.Tensor, dict[str, torch.Tensor], LayerBudget, RunSettings], Decomposition]


@dataclass(frozen=True)
class Algorithm:
    """A registered method.

    Args:
        name: the `OATSConfig.method` value.
        label: how a model card names it.
        statistics: the calibration statistics `run` reads.
        uses_low_rank: whether it keeps a low-rank term (and so takes `rank_ratio`).
        run: the one-shot compression, or None for a method that trains (`optimum_oats.training`).
        rows_balanced: whether its unstructured masks keep the same number of weights in every row (a per-row top-k,
            as OATS and Wanda; SparseGPT's and magnitude's references choose per block or per layer). Loading checks
            it on checkpoints that predate the integrity records (`integrations/checkpoint.py`).
        quantizes_jointly: whether `run` rounds the values itself while placing them, compensating each rounding
            error (SparseGPT's and hassle's OBS passes); otherwise [`compress_layer`] rounds its result to nearest.
    """

    name: str
    label: str
    statistics: tuple[str, ...]
    uses_low_rank: bool
    run: Run | None = None
    rows_balanced: bool = False
    quantizes_jointly: bool = False

    @property
    def one_shot(self) -> bool:
        return self.run is not None


def compress_layer(
    algorithm: Algorithm,
    weight: torch.Tensor,
    statistics: dict[str, torch.Tensor],
    budget: LayerBudget,
    settings: RunSettings,
) -> Decomposition:
    """Run `algorithm` on one layer; for a method that does not quantize jointly, round what it returns to nearest
    (S's kept values and U, V each on its own grid), so every method's result is on the configured grid."""
    decomposition = algorithm.run(weight, statistics, budget, settings)
    if algorithm.quantizes_jointly:
        return decomposition
    values, factors = value_spec(settings), lowrank_spec(settings)
    if values is not None:
        decomposition.sparse, decomposition.value_scales = quantize_rtn(decomposition.sparse, values)
    if factors is not None and decomposition.lowrank_u is not None:
        decomposition.lowrank_u, decomposition.lowrank_u_scales = quantize_rtn(decomposition.lowrank_u, factors)
        decomposition.lowrank_v, decomposition.lowrank_v_scales = quantize_rtn(decomposition.lowrank_v, factors)
    return decomposition


ALGORITHMS: dict[str, Algorithm] = {}
# Methods whose checkpoints this format stores but that `compress()` cannot run.
TRAINED_METHODS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    (ALGORITHMS if algorithm.one_shot else TRAINED_METHODS)[algorithm.name] = algorithm
    return algorithm


def method_info(name: str) -> Algorithm:
    """The registry entry of a one-shot or training-time method."""
    return ALGORITHMS.get(name) or TRAINED_METHODS[name]


def _run_oats(weight, stats, budget, settings) -> Decomposition:
    return oats_decompose(
        weight,
        stats[INPUT_NORMS],
        rank=budget.rank,
        keep_per_row=budget.keep_per_row,
        nm=budget.nm,
        iterations=settings.num_iterations,
        solver=settings.svd,
    )


def _run_wanda(weight, stats, budget, settings) -> Decomposition:
    return Decomposition(
        wanda_prune(weight.float(), stats[INPUT_NORMS], keep_per_row=budget.keep_per_row, nm=budget.nm)
    )


def _layer_sparsity(weight: torch.Tensor, budget: LayerBudget) -> float:
    """The budget's kept count as one layer-wide sparsity, for the references' joint (not per-row) masks."""
    return 1.0 - budget.keep_per_row / weight.shape[1]


def _run_sparsegpt(weight, stats, budget, settings) -> Decomposition:
    """The reference's joint mask per 128-column block (IST-DASLab/sparsegpt `fasterprune`); N:M per row."""
    if budget.nm is not None:
        return Decomposition(sparsegpt_prune(weight, stats[HESSIAN], nm=budget.nm))
    sparsity = _layer_sparsity(weight, budget)
    quant = value_spec(settings)
    if quant is not None:
        sparse, scales = sparsegpt_prune_quantized(weight, stats[HESSIAN], quant, sparsity=sparsity)
        return Decomposition(sparse, value_scales=scales)
    return Decomposition(sparsegpt_prune(weight, stats[HESSIAN], sparsity=sparsity))


def _run_hassle(weight, stats, budget, settings) -> Decomposition:
    """OATS at the same budget as the first iterate, then S/L alternation in the full Hessian metric."""
    warm = _run_oats(weight, stats, budget, settings) if budget.rank > 0 else None  # unrounded: refitted first
    return quantized_hessian_sparse_low_rank(
        weight,
        hessian_metric(stats[HESSIAN], shrinkage=_shrinkage(weight, budget, settings)),
        value_spec(settings),
        lowrank_spec(settings),
        rank=budget.rank,
        sparsity=None if budget.nm is not None else _layer_sparsity(weight, budget),
        nm=budget.nm,
        iterations=settings.hessian_iterations if budget.rank > 0 else 1,  # L = 0: every pass would be the same
        warm_start=warm,
    )


def _shrinkage(weight: torch.Tensor, budget: LayerBudget, settings: RunSettings) -> float:
    """The configured λ, or the default for the rate this layer's budget actually removes."""
    if settings.hessian_shrinkage is not None:
        return settings.hessian_shrinkage
    d_out, d_in = weight.shape
    return default_shrinkage(1.0 - budget.num_parameters(d_out, d_in) / (d_out * d_in))


def _run_magnitude(weight, stats, budget, settings) -> Decomposition:
    """One threshold per layer (wanda `prune_magnitude`); N:M per row."""
    if budget.nm is not None:
        return Decomposition(magnitude_prune(weight.float(), keep_per_row=budget.keep_per_row, nm=budget.nm))
    return Decomposition(magnitude_prune(weight.float(), sparsity=_layer_sparsity(weight, budget)))


register_algorithm(
    Algorithm("oats", "OATS, sparse + low-rank", (INPUT_NORMS,), uses_low_rank=True, run=_run_oats, rows_balanced=True)
)
register_algorithm(
    Algorithm(
        "hassle",
        "Hessian-aware sparse + low-rank (OATS start, SparseGPT / weighted-SVD alternation)",
        (HESSIAN, INPUT_NORMS),
        uses_low_rank=True,
        run=_run_hassle,
        quantizes_jointly=True,
    )
)
register_algorithm(
    Algorithm("wanda", "Wanda pruning", (INPUT_NORMS,), uses_low_rank=False, run=_run_wanda, rows_balanced=True)
)
register_algorithm(
    Algorithm(
        "sparsegpt", "SparseGPT pruning", (HESSIAN,), uses_low_rank=False, run=_run_sparsegpt, quantizes_jointly=True
    )
)
register_algorithm(Algorithm("magnitude", "magnitude pruning", (), uses_low_rank=False, run=_run_magnitude))
register_algorithm(Algorithm("losparse", "LoSparse, low-rank + structured sparse", (), uses_low_rank=True))
