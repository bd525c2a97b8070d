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
from .hessian_slr import default_shrinkage, hessian_metric, hessian_sparse_low_rank
from .oats import Decomposition, oats_decompose
from .pruning import magnitude_prune, wanda_prune
from .sparsegpt import sparsegpt_prune

# Calibration statistics an algorithm may ask for; the engine collects only these.
INPUT_NORMS = "input_norms"
HESSIAN = "hessian"


class RunSettings(Protocol):
    """The solver settings an algorithm may read; `OATSConfig` has them, and this package need not import it."""

    num_iterations: int
    svd: str
    hessian_iterations: int
    hessian_shrinkage: float | None


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
    """

    name: str
    label: str
    statistics: tuple[str, ...]
    uses_low_rank: bool
    run: Run | None = None
    rows_balanced: bool = False

    @property
    def one_shot(self) -> bool:
        return self.run is not None


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
    return Decomposition(sparsegpt_prune(weight, stats[HESSIAN], sparsity=_layer_sparsity(weight, budget)))


def _run_hassle(weight, stats, budget, settings) -> Decomposition:
    """OATS at the same budget as the first iterate, then S/L alternation in the full Hessian metric."""
    warm = _run_oats(weight, stats, budget, settings) if budget.rank > 0 else None
    return hessian_sparse_low_rank(
        weight,
        hessian_metric(stats[HESSIAN], shrinkage=_shrinkage(weight, budget, settings)),
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
    )
)
register_algorithm(
    Algorithm("wanda", "Wanda pruning", (INPUT_NORMS,), uses_low_rank=False, run=_run_wanda, rows_balanced=True)
)
register_algorithm(Algorithm("sparsegpt", "SparseGPT pruning", (HESSIAN,), uses_low_rank=False, run=_run_sparsegpt))
register_algorithm(Algorithm("magnitude", "magnitude pruning", (), uses_low_rank=False, run=_run_magnitude))
register_algorithm(Algorithm("losparse", "LoSparse, low-rank + structured sparse", (), uses_low_rank=True))
