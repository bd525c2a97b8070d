"""Execution modes of `Layer`: how the forward pass turns compact storage into outputs.

Each mode is a function `(layer, x) -> y` registered by name, so faster kernels can be added without touching
the layer. Every mode computes `x S^T + (x V^T) U^T + b`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The compact layer (`sparse_lowrank.LinearSparseLowRank`), which imports this module: annotated loosely here.
Layer = nn.Module


ExecutionFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]
EXECUTION_MODES: dict[str, ExecutionFn] = {}


def register_execution_mode(name: str) -> Callable[[ExecutionFn], ExecutionFn]:
    def decorator(fn: ExecutionFn) -> ExecutionFn:
        EXECUTION_MODES[name] = fn
        return fn

    return decorator


def _low_rank(layer: Layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if layer.rank == 0:
        return y
    return y + F.linear(F.linear(x, layer.lowrank_v), layer.lowrank_u)


@register_execution_mode("decompress")
def decompress_forward(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Rebuild S densely for this call only: always correct, differentiable, no extra resident memory."""
    return _low_rank(layer, x, F.linear(x, layer.sparse_weight(), layer.bias))


@register_execution_mode("merged")
def merged_forward(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Dense speed with compact storage on disk: caches `S + U V` on first use (costs a dense matrix of memory)."""
    return F.linear(x, layer.merged_weight(x.dtype), layer.bias)
