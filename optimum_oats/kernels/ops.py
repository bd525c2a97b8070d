"""The compressed layer's forward as one `torch.library` custom op, so `torch.compile` traces it whole.

`torch.ops.optimum_oats.sparse_lowrank_linear(x, values, mask, lowrank_u, lowrank_v, bias, value_scales, value_bits,
group_size, mode)` computes `x Sᵀ + (x Vᵀ) Uᵀ + b` from the stored values (or quantized codes) and packed bitmask
([`PackedWeights`] spread out), in execution mode `mode` ("auto", "sparse_kernel" or "workspace"). Its
implementations:

- CPU: the path `dispatch.plan` picks (the C++ kernel, the shared workspace, or PyTorch);
- CUDA: likewise, the Triton paths (decode, workspace, 2:4) where eligible;
- any other device (the default): decompress + matmul, plain PyTorch;
- fake (meta): the output's shape and dtype, all a graph needs.

The offset tables are looked up inside (cached with the mask, `operands.py`), so nothing outside the op reads a
data pointer or a version counter: the traced graph has no break. Eager calls go through [`linear`], which runs the
same code without the dispatcher's ~10 us (several % of a decode step). The op is inference-only (no autograd
formula): callers send calls that need gradients to the differentiable PyTorch path first.
"""

from __future__ import annotations

import torch

from . import dispatch
from .operands import PackedWeights

OP_NAME = "optimum_oats::sparse_lowrank_linear"


@torch.library.custom_op(OP_NAME, mutates_args=())
def sparse_lowrank_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    lowrank_u: torch.Tensor,
    lowrank_v: torch.Tensor,
    bias: torch.Tensor | None,
    value_scales: torch.Tensor | None,
    value_bits: int,
    group_size: int,
    mode: str,
) -> torch.Tensor:
    """The default implementation (devices without their own): decompress + matmul in PyTorch."""
    w = PackedWeights(values, mask, lowrank_u, lowrank_v, bias, value_scales, value_bits, group_size)
    return dispatch.decompress_linear(w, x)


def _dispatched(x, values, mask, lowrank_u, lowrank_v, bias, value_scales, value_bits, group_size, mode):
    w = PackedWeights(values, mask, lowrank_u, lowrank_v, bias, value_scales, value_bits, group_size)
    path, kernel = dispatch.plan(w, x, mode)
    return dispatch.run_path(path, w, x, kernel)


sparse_lowrank_linear.register_kernel("cpu")(_dispatched)
sparse_lowrank_linear.register_kernel("cuda")(_dispatched)


@sparse_lowrank_linear.register_fake
def _(x, values, mask, lowrank_u, lowrank_v, bias, value_scales, value_bits, group_size, mode):
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


def linear(w: PackedWeights, x: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """`x (S + U V)ᵀ + b` for an inference call: the op under `torch.compile`, its implementation directly in eager."""
    if torch.compiler.is_compiling():
        return torch.ops.optimum_oats.sparse_lowrank_linear(x, *w, mode)
    path, kernel = dispatch.plan(w, x, mode)
    return dispatch.run_path(path, w, x, kernel)


__all__ = ["OP_NAME", "linear", "sparse_lowrank_linear"]
