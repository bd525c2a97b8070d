"""A toy one-shot method in one file, as a plug-in would write it: its math, its settings and its `Algorithm`.

Registering it is one line, `register_algorithm(TOY)`; then `OATSConfig(method="toy")`, `compress()` and
`oats compress --method toy --norm-power P` take it (tests/algorithms/test_plugin_method.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optimum_oats.algorithms import INPUT_NORMS, Algorithm, Decomposition, LayerBudget, sparsity_mask
from optimum_oats.utils.settings import check_float, setting


@dataclass
class ToySettings:
    """`norm_power`: p in the score `|W_ij| · ||X_j||^p` (0: magnitude within each row, 1: Wanda)."""

    norm_power: float = setting(0.5, "Exponent of the input norms in the toy score", "P")

    def __post_init__(self) -> None:
        self.norm_power = check_float("norm_power", self.norm_power, 0.0, 4.0, low_inclusive=True)


def run_toy(weight: torch.Tensor, stats: dict[str, torch.Tensor], budget: LayerBudget, settings: ToySettings):
    scores = weight.abs().float() * stats[INPUT_NORMS].to(weight.device, torch.float32) ** settings.norm_power
    return Decomposition(weight.float() * sparsity_mask(scores, budget.keep_per_row, budget.nm))


TOY = Algorithm("toy", "toy pruning", (INPUT_NORMS,), uses_low_rank=False, run=run_toy, settings=ToySettings)
