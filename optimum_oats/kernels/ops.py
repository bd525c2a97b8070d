"""The compiled layer forward as a `torch.library` custom op, so `torch.compile` traces through it.

`torch.ops.optimum_oats.sparse_lowrank_forward(x, values, mask, offsets, u, v, bias)` computes
`x Sᵀ + (x Vᵀ) Uᵀ + b` from the stored values and packed bitmask. Its fake implementation gives the output's shape
and dtype without running anything, which is all a graph needs. Callers check `load_kernel()` first: the op runs
only where the extension is built.
"""

from __future__ import annotations

import torch

from . import load_kernel


@torch.library.custom_op("optimum_oats::sparse_lowrank_forward", mutates_args=())
def sparse_lowrank_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    offsets: torch.Tensor,
    lowrank_u: torch.Tensor,
    lowrank_v: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    kernel = load_kernel()
    if kernel is None:
        raise RuntimeError(
            "optimum_oats::sparse_lowrank_forward needs the compiled kernel (see optimum_oats.kernels)."
        )
    return kernel.sparse_lowrank_forward(x, values, mask, offsets, lowrank_u, lowrank_v, bias)


@sparse_lowrank_forward.register_fake
def _(x, values, mask, offsets, lowrank_u, lowrank_v, bias):
    return x.new_empty((*x.shape[:-1], mask.shape[0]))
