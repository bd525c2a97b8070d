"""GPU execution of `LinearSparseLowRank` storage: Triton decode, workspace prefill, and 2:4 semi-structured prefill.

This module imports neither Triton nor CUDA at import time: [`triton_ready`] imports Triton on first use only, and
`dispatch.py` loads this module on the first CUDA call, so the CPU build never needs either. Which path runs is
decided in `dispatch.py`; here are the paths, each taking the storage as [`PackedWeights`] and looking up the mask's
offset tables itself:

- `"triton_decode"` (few tokens): [`triton_forward`], one Triton kernel reading values + packed bitmask + offset
  tables, the low-rank term fused in its epilogue (after one tiny `x Vᵀ` GEMM), split-K when rows are few;
- `"triton_workspace"` (many tokens): [`triton_prefill`], S decompressed by a Triton kernel into a workspace shared
  by every layer of the same shape (a memory-bound pass), then one dense GEMM plus the low-rank GEMMs;
- `"semi_structured"` (prefill of a 2:4 layer on a GPU with sparse tensor cores): [`semi_structured_prefill`], the
  decompressed S converted with `torch.sparse.to_sparse_semi_structured` (cuSPARSELt / CUTLASS) for the sparse GEMM.

Every launch runs under `torch.cuda.device(x.device)`: Triton launches on the *current* device, and a layer on
`cuda:1` (a model spread with `device_map="auto"`) must not run on `cuda:0`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import warnings

import torch
import torch.nn.functional as F

from ..utils.quantization import SCALE_DTYPE
from . import kernels_disabled
from .operands import PackedWeights, chunk_offsets
from .workspaces import workspace

logger = logging.getLogger(__name__)

semi_structured_failed: set[torch.device] = set()  # devices where the 2:4 GEMM raised once: not tried again


@functools.cache
def _triton_module():
    """The Triton kernel module, or `None` when Triton is missing or fails to import (logged once)."""
    if importlib.util.find_spec("triton") is None:
        logger.info("Triton is not installed: compressed layers on CUDA use the PyTorch path.")
        return None
    try:
        from . import triton_sparse_lowrank
    except Exception as err:  # a broken Triton install must not break the model: the PyTorch path is always correct
        warnings.warn(
            f"optimum-oats could not import its Triton kernels ({type(err).__name__}: {err}); compressed layers on "
            "CUDA fall back to the PyTorch path (correct, slower).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return triton_sparse_lowrank


def triton_ready() -> bool:
    """Whether the Triton kernels can run: Triton importable and `OATS_DISABLE_KERNELS` unset (cached import)."""
    return not kernels_disabled() and _triton_module() is not None


def _kernels():
    module = _triton_module()
    if module is None:
        raise RuntimeError("Triton is not available: install it (`pip install triton`) or use another execution mode.")
    return module


def takes(w: PackedWeights) -> bool:
    """Whether the Triton kernels read this storage: float values, or quantized codes of 2 to 8 bits (any group
    size: the kernels index each value's scale by its column)."""
    return not w.quantized or (2 <= w.value_bits <= 8 and w.group_size >= 1)


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.cuda.device(device)` for a CUDA device (Triton launches on the current one), else nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _tables(w: PackedWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask's offset tables (cached with it), after checking the storage the kernels index into."""
    out_features, in_features = w.out_features, w.in_features
    if w.mask.dtype != torch.uint8 or tuple(w.mask.shape) != (out_features, (in_features + 7) // 8):
        raise ValueError(
            f"`bitmask` must be uint8 of shape {(out_features, (in_features + 7) // 8)}, got {w.mask.dtype} "
            f"{tuple(w.mask.shape)}."
        )
    if not (w.values.is_contiguous() and w.mask.is_contiguous()):
        raise ValueError("`values` and `bitmask` must be contiguous (they are as stored by the layer).")
    return w.value_offsets(), chunk_offsets(w.mask)


def _codes(w: PackedWeights):
    """The kernels' description of quantized values (codes, fp16 scales, bits, group, offset), None for floats."""
    if not w.quantized:
        return None
    groups = -(-w.in_features // w.group_size)
    scales = w.value_scales
    if scales.dtype != torch.int16 or tuple(scales.shape) != (w.out_features, groups) or not scales.is_contiguous():
        raise ValueError(
            f"`weight_scales` must be contiguous int16 of shape {(w.out_features, groups)}, got {scales.dtype} "
            f"{tuple(scales.shape)}."
        )
    return _kernels().Codes(scales.view(SCALE_DTYPE), w.value_bits, w.group_size, w.value_spec.offset)


def triton_forward(x: torch.Tensor, w: PackedWeights, *, split_k: int | None = None) -> torch.Tensor:
    """`y = x (S + U V)ᵀ + b` with the Triton decode kernel; S is read from the compact storage as stored.

    Args:
        x (`torch.Tensor`): `(..., in_features)`, the layer's dtype.
        w (`PackedWeights`): the layer's storage.
        split_k (`int`, *optional*): programs per row block's columns; by default enough to fill the GPU.

    Returns:
        `torch.Tensor` of shape `(..., out_features)` in the dtype of `x`.
    """
    if x.shape[-1] != w.in_features:
        raise ValueError(f"`x` has {x.shape[-1]} features, the layer takes {w.in_features}.")
    offsets, chunks = _tables(w)
    flat = x.reshape(-1, w.in_features).contiguous()
    with on_device(x.device):
        y = _kernels().decode(
            flat, w.values, w.mask, offsets, chunks, w.lowrank_u.contiguous(), w.lowrank_v.contiguous(), w.bias,
            split_k=split_k, codes=_codes(w),
        )  # fmt: skip
    return y.view(*x.shape[:-1], w.out_features)


def triton_decompress(w: PackedWeights, out: torch.Tensor) -> torch.Tensor:
    """Write S densely into `out` (`(out_features, in_features)`, unit column stride; every entry overwritten)."""
    if tuple(out.shape) != (w.out_features, w.in_features) or out.stride(1) != 1:
        raise ValueError(
            f"`out` must be {(w.out_features, w.in_features)} with unit column stride, got {tuple(out.shape)} "
            f"with strides {out.stride()}."
        )
    offsets, chunks = _tables(w)
    with on_device(out.device):
        return _kernels().decompress(w.values, w.mask, offsets, chunks, out, _codes(w))


def _add_low_rank(y: torch.Tensor, x: torch.Tensor, w: PackedWeights) -> torch.Tensor:
    if w.rank == 0:
        return y
    return y.addmm_(x @ w.lowrank_v.t(), w.lowrank_u.t())  # (x Vᵀ) Uᵀ: 2 r (d_in + d_out) FLOPs per token


def triton_prefill(x: torch.Tensor, w: PackedWeights) -> torch.Tensor:
    """`y = x (S + U V)ᵀ + b` for many tokens: S decompressed into the shared workspace, then dense GEMMs."""
    dense = triton_decompress(w, workspace(w.out_features, w.in_features, w.dtype, w.values.device))
    flat = x.reshape(-1, w.in_features)
    y = _add_low_rank(F.linear(flat, dense, w.bias), flat, w)
    return y.view(*x.shape[:-1], w.out_features)


def semi_structured_prefill(x: torch.Tensor, w: PackedWeights) -> torch.Tensor:
    """Prefill of a 2:4 layer through `torch.sparse.to_sparse_semi_structured`; falls back to [`triton_prefill`].

    S is decompressed into the shared workspace and converted per call (two memory-bound passes), so nothing
    beyond the compact storage stays resident. A failure (e.g. cuSPARSELt missing from this torch build) is
    warned once per device and the workspace path is used from then on (`semi_structured_failed`).
    """
    dense = triton_decompress(w, workspace(w.out_features, w.in_features, w.dtype, w.values.device))
    flat = x.reshape(-1, w.in_features)
    try:
        y = F.linear(flat, torch.sparse.to_sparse_semi_structured(dense), w.bias)
    except (RuntimeError, NotImplementedError) as err:
        semi_structured_failed.add(w.values.device)
        warnings.warn(
            f"2:4 semi-structured sparse GEMM failed on {w.values.device} ({err}); using the dense workspace path.",
            RuntimeWarning,
            stacklevel=2,
        )
        y = F.linear(flat, dense, w.bias)
    y = _add_low_rank(y, flat, w)
    return y.view(*x.shape[:-1], w.out_features)


PATHS = {
    "triton_decode": triton_forward,
    "triton_workspace": triton_prefill,
    "semi_structured": semi_structured_prefill,
}


def run(path: str, w: PackedWeights, x: torch.Tensor) -> torch.Tensor:
    """Run the GPU path `path` (a key of `PATHS`, as `dispatch.choose_path` names it) on the device of `x`."""
    with on_device(x.device):
        return PATHS[path](x, w)


__all__ = [
    "PATHS",
    "on_device",
    "run",
    "semi_structured_failed",
    "semi_structured_prefill",
    "triton_decompress",
    "triton_forward",
    "triton_prefill",
    "triton_ready",
]
