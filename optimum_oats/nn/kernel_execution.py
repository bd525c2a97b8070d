"""The compiled execution modes of `LinearSparseLowRank`: `"sparse_kernel"`, `"workspace"` and `"auto"` (default).

Each hands the layer's storage ([`LinearSparseLowRank.packed`]) to `optimum_oats.kernels.ops.linear`, the
`torch.library` op `optimum_oats::sparse_lowrank_linear` (its implementation called directly in eager), whose
implementations pick the path by the rules of `optimum_oats/kernels/dispatch.py`: the C++ kernel for CPU decode, a
shared workspace and one dense GEMM for prefill, the Triton kernels on CUDA. The measured crossovers are in
docs/inference.md. The kernels are inference-only: whenever autograd needs this call's graph, every mode runs the
differentiable `"decompress"` path instead (warned once on CUDA, where that rebuilds a dense S per call).
"""

from __future__ import annotations

import torch

from ..kernels import dispatch
from ..kernels.dispatch import AUTO_MAX_KERNEL_TOKENS, GPU_PATHS, needs_grad
from ..kernels.ops import linear
from ..kernels.workspaces import release_workspaces, workspace
from .execution import Layer, decompress_forward, register_execution_mode

__all__ = [
    "AUTO_MAX_KERNEL_TOKENS",
    "choose_mode",
    "choose_path",
    "fold_low_rank",
    "release_workspaces",
    "row_offsets",
    "workspace",
]


def row_offsets(layer: Layer) -> torch.Tensor:
    """Start of each row's kept values in `layer.weight` (cached with the mask: `LinearSparseLowRank.row_offsets`)."""
    return layer.row_offsets()


def fold_low_rank(layer: Layer, tokens: int) -> bool:
    """Whether the workspace path adds `U V` into the workspace for this many tokens (`dispatch.fold_low_rank`)."""
    return dispatch.fold_low_rank(layer.packed(), tokens)


def _compiled(mode: str):
    def forward(layer: Layer, x: torch.Tensor) -> torch.Tensor:
        w = layer.packed()
        if needs_grad(w, x):
            dispatch.warn_dense_training_once(w, x)
            return decompress_forward(layer, x)
        return linear(w, x, mode)

    forward.__name__ = f"{mode}_forward"
    forward.__doc__ = f"Execution mode {mode!r}: see the module docstring and `optimum_oats/kernels/dispatch.py`."
    return register_execution_mode(mode)(forward)


sparse_kernel_forward = _compiled("sparse_kernel")
workspace_forward = _compiled("workspace")
auto_forward = _compiled("auto")


def choose_path(layer: Layer, x: torch.Tensor, mode: str | None = None) -> str:
    """The path that computes this call (a `dispatch` path name, or "decompress" when autograd needs the graph)."""
    w = layer.packed()
    if needs_grad(w, x):
        return "decompress"
    return dispatch.choose_path(w, x, layer.execution_mode if mode is None else mode)


def choose_mode(layer: Layer, x: torch.Tensor) -> str:
    """The mode "auto" runs for this call: "decompress" (training, or no kernel can run it), "workspace" (CPU
    prefill), or "sparse_kernel" (the C++ kernel for CPU decode, and every Triton path on CUDA)."""
    path = choose_path(layer, x, "auto")
    return "sparse_kernel" if path == "cpu_kernel" or path in GPU_PATHS else path
