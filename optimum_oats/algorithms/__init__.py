"""Compression algorithms as pure tensor functions, plus a registry that says which statistic each needs.

This package imports only torch: the model traversal that feeds it lives in `optimum_oats.compress`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .budget import LayerBudget, layer_budget
from .masks import nm_mask, rowwise_topk_mask, sparsity_mask
from .oats import Decomposition, oats_decompose, truncated_svd
from .owl import outlier_ratios, owl_block_rates
from .pruning import magnitude_prune, wanda_prune
from .sparsegpt import sparsegpt_prune

# Calibration statistics an algorithm may ask for; the runner collects only these.
INPUT_NORMS = "input_norms"
HESSIAN = "hessian"


class RunSettings(Protocol):
    """The solver settings an algorithm may read; `OATSConfig` has them, and this package need not import it."""

    num_iterations: int
    svd: str


@dataclass(frozen=True)
class Algorithm:
    """A registered method: `run(weight, statistics, budget, settings) -> Decomposition`."""

    name: str
    statistics: tuple[str, ...]
    uses_low_rank: bool
    run: Callable[[torch.Tensor, dict[str, torch.Tensor], LayerBudget, RunSettings], Decomposition]


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


register_algorithm(
    Algorithm(
        name="oats",
        statistics=(INPUT_NORMS,),
        uses_low_rank=True,
        run=lambda weight, stats, budget, settings: oats_decompose(
            weight,
            stats[INPUT_NORMS],
            rank=budget.rank,
            keep_per_row=budget.keep_per_row,
            nm=budget.nm,
            iterations=settings.num_iterations,
            solver=settings.svd,
        ),
    )
)
register_algorithm(
    Algorithm(
        name="wanda",
        statistics=(INPUT_NORMS,),
        uses_low_rank=False,
        run=lambda weight, stats, budget, settings: Decomposition(
            wanda_prune(weight.float(), stats[INPUT_NORMS], keep_per_row=budget.keep_per_row, nm=budget.nm)
        ),
    )
)
register_algorithm(
    Algorithm(
        name="sparsegpt",
        statistics=(HESSIAN,),
        uses_low_rank=False,
        run=lambda weight, stats, budget, settings: Decomposition(
            sparsegpt_prune(weight, stats[HESSIAN], keep_per_row=budget.keep_per_row, nm=budget.nm)
        ),
    )
)
register_algorithm(
    Algorithm(
        name="magnitude",
        statistics=(),
        uses_low_rank=False,
        run=lambda weight, stats, budget, settings: Decomposition(
            magnitude_prune(weight.float(), keep_per_row=budget.keep_per_row, nm=budget.nm)
        ),
    )
)

__all__ = [
    "ALGORITHMS",
    "HESSIAN",
    "INPUT_NORMS",
    "Algorithm",
    "Decomposition",
    "LayerBudget",
    "RunSettings",
    "layer_budget",
    "magnitude_prune",
    "nm_mask",
    "oats_decompose",
    "outlier_ratios",
    "owl_block_rates",
    "register_algorithm",
    "rowwise_topk_mask",
    "sparsegpt_prune",
    "sparsity_mask",
    "truncated_svd",
    "wanda_prune",
]
