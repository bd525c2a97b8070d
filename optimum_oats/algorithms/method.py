"""What a compression method is: its `run`, its settings dataclass, and the calibration statistics it reads.

A method lives in one module: its math, its settings dataclass (fields declared with `utils.settings.setting`, so
that they become `--flags` of `oats compress`), and an [`Algorithm`] naming them. One `register_algorithm` line
(`registry.py`) makes it a value of `OATSConfig.method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .budget import LayerBudget

if TYPE_CHECKING:
    from .oats import Decomposition

# Calibration statistics an algorithm may ask for; the engine collects only these.
INPUT_NORMS = "input_norms"
HESSIAN = "hessian"


@dataclass
class NoSettings:
    """The settings of a method that has none of its own (the pruning baselines)."""


# `run(weight, statistics, budget, settings) -> Decomposition`: a pure tensor function; `settings` is an instance
# of the method's settings dataclass.
Run = Callable[[torch.Tensor, dict[str, torch.Tensor], LayerBudget, Any], "Decomposition"]


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
        settings: the dataclass of its own settings (`OATSConfig.method_settings`).
        quantizes_jointly: whether `run` rounds the values itself while placing them (`budget.values`,
            `budget.factors`), compensating each rounding error (SparseGPT's and hassle's OBS passes); otherwise
            the registry's [`compress_layer`] rounds its result to nearest.
    """

    name: str
    label: str
    statistics: tuple[str, ...]
    uses_low_rank: bool
    run: Run | None = None
    rows_balanced: bool = False
    settings: type = NoSettings
    quantizes_jointly: bool = False

    @property
    def one_shot(self) -> bool:
        return self.run is not None
