"""Calibration statistics of a linear layer's inputs, collected by hooks while its block runs.

`input_norms` is Wanda/OATS's `D = ||X_j||_2` per input feature; `hessian` is SparseGPT's `H = 2 XᵀX / n`
(Frantar & Alistarh, ICML 2023, https://arxiv.org/abs/2301.00774, reference `SparseGPT.add_batch`). Padding
positions of the running sample are never counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..algorithms import HESSIAN, INPUT_NORMS

HESSIAN_PRECISION = torch.float32
# Which calibration positions count in the statistics while a sample runs through a block (None: all of them).
_TOKEN_MASK: ContextVar[torch.Tensor | None] = ContextVar("oats_token_mask", default=None)


class InputNormAccumulator:
    """Accumulates `sum_t x_tj^2` per input feature; `finalize()` gives `||X_j||_2` (Wanda/OATS's D)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum_squares += flat.square().sum(dim=0).double()
        self.tokens += flat.shape[0]

    def finalize(self) -> torch.Tensor:
        return self.sum_squares.sqrt().float()


class HessianAccumulator:
    """Running average of `2 x^T x` over calibration tokens; `finalize()` gives `(d_in, d_in)` float32 `H`.

    Same interface as `InputNormAccumulator`. Like the reference, `H` is kept as a running average (rescaled by
    `n_old / n_new` before each addition) in float32, so it stays well scaled however many tokens are seen.
    Here `n` counts tokens; the reference counts sequences, which only rescales `H` and leaves SparseGPT's
    result unchanged (the damping is relative to `mean(diag H)` and the OBS update is scale-invariant).
    """

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=HESSIAN_PRECISION, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        """Add a batch `x` of shape `(..., in_features)`, any float dtype."""
        flat = x.detach().reshape(-1, x.shape[-1]).to(device=self.hessian.device, dtype=HESSIAN_PRECISION)
        batch = flat.shape[0]
        if batch == 0:
            return
        total = self.tokens + batch
        self.hessian.addmm_(flat.T, flat, beta=self.tokens / total, alpha=2 / total)
        self.tokens = total

    def finalize(self) -> torch.Tensor:
        return self.hessian


STATISTICS = {INPUT_NORMS: InputNormAccumulator, HESSIAN: HessianAccumulator}


def counted_positions(x: torch.Tensor) -> torch.Tensor:
    """The rows of a linear layer's input `x (..., d_in)` that count: padding positions of the running sample
    are dropped.

    The mask applies when `x` is laid out `(batch, seq, d_in)` like the sample; inputs of another shape (DeBERTa's
    relative-position embeddings, which its attention projects with the same `query_proj`/`key_proj`) are not
    per-token and count in full.
    """
    mask = _TOKEN_MASK.get()
    if mask is not None and x.shape[:-1] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


@contextmanager
def counting_positions(token_mask: torch.Tensor | None) -> Iterator[None]:
    """While a sample runs: only the positions where `token_mask` (`(batch, seq)` bool) is true count."""
    token = _TOKEN_MASK.set(token_mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(token)


@contextmanager
def collect_statistics(linears: dict[str, nn.Linear], needed: tuple[str, ...]) -> Iterator[dict[str, dict]]:
    """Hook `linears` while the block runs; yields `{layer: {statistic: accumulator}}`.

    Padding positions (where the running sample's attention mask is 0) are not counted.
    """
    accumulators: dict[str, dict] = {
        name: {stat: STATISTICS[stat](layer.in_features, layer.weight.device) for stat in needed}
        for name, layer in linears.items()
    }
    handles = []
    for name, layer in linears.items():
        if not needed:
            continue

        def hook(_module: nn.Module, args: tuple, _output: Any, name: str = name) -> None:
            x = counted_positions(args[0])
            for accumulator in accumulators[name].values():
                accumulator.update(x)

        handles.append(layer.register_forward_hook(hook))
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
