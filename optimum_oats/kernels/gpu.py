"""GPU execution of `LinearSparseLowRank` storage: Triton decode, workspace prefill, and 2:4 semi-structured prefill.

This module imports neither Triton nor CUDA at import time: [`triton_available`] answers `False` on a CPU tensor
without importing anything, so the CPU build never needs them. The functions take the layer's tensors, not the
layer, so the execution dispatch in `optimum_oats/nn` decides when to call them (see [`choose_gpu_path`]):

- decode (few tokens): [`triton_forward`], one Triton kernel reading values + packed bitmask + row offsets, the
  low-rank term fused in its epilogue (after one tiny `x Vᵀ` GEMM);
- prefill (many tokens): [`triton_prefill`], S decompressed by a Triton kernel into a workspace shared by every
  layer of the same shape (a memory-bound pass), then one dense GEMM plus the low-rank GEMMs;
- prefill of a 2:4 layer on a GPU with sparse tensor cores: [`semi_structured_prefill`], the decompressed S
  converted with `torch.sparse.to_sparse_semi_structured` (cuSPARSELt / CUTLASS) for the sparse GEMM.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import warnings

import torch
import torch.nn.functional as F

from . import kernels_disabled

logger = logging.getLogger(__name__)

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Most tokens (rows of x) for which the Triton decode kernel is chosen; above it the workspace + dense GEMM path
# (compute-bound) wins. A first guess from the bytes/FLOP balance of an H100/H200: benchmarks/gpu.py measures
# the crossover (decode at 1/4/16 tokens vs prefill) and this constant should follow its numbers.
GPU_MAX_DECODE_TOKENS = 16
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
SEMI_STRUCTURED_MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere and later
SEMI_STRUCTURED_MULTIPLE = (32, 64)  # rows, columns of S: the strictest of torch's CUTLASS/cuSPARSELt constraints

# Bytes whose two nibbles each hold at most 2 set bits: a 2:4 pattern on columns (4j, 4j + 4).
_TWO_FOUR_BYTE = torch.tensor([bin(b & 15).count("1") <= 2 and bin(b >> 4).count("1") <= 2 for b in range(256)])

_workspaces: dict[tuple[torch.device, torch.dtype, int, int], torch.Tensor] = {}
_semi_structured_failed: set[torch.device] = set()


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


def triton_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can compute a call on `x`: a CUDA tensor in fp16/bf16/fp32 and Triton importable.

    Cheap after the first call (cached import); never imports Triton for a CPU tensor. `OATS_DISABLE_KERNELS=1`
    turns it off like the CPU kernel.
    """
    return x.is_cuda and x.dtype in GPU_DTYPES and not kernels_disabled() and _triton_module() is not None


def _kernels():
    module = _triton_module()
    if module is None:
        raise RuntimeError("Triton is not available: install it (`pip install triton`) or use another execution mode.")
    return module


def _check(
    values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, out_features: int, in_features: int
):
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (out_features, (in_features + 7) // 8):
        raise ValueError(
            f"`bitmask` must be uint8 of shape {(out_features, (in_features + 7) // 8)}, got {bitmask.dtype} "
            f"{tuple(bitmask.shape)}."
        )
    if row_offsets.dtype != torch.int64 or row_offsets.numel() != out_features + 1:
        raise ValueError(
            f"`row_offsets` must be int64 with {out_features + 1} entries (from the mask's popcounts), got "
            f"{row_offsets.dtype} with {row_offsets.numel()}."
        )
    if not (values.is_contiguous() and bitmask.is_contiguous() and row_offsets.is_contiguous()):
        raise ValueError("`values`, `bitmask` and `row_offsets` must be contiguous (they are as stored by the layer).")


def triton_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    lowrank_u: torch.Tensor,
    lowrank_v: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y = x (S + U V)ᵀ + b` with the Triton decode kernel; S is read from the compact storage as stored.

    Args:
        x (`torch.Tensor`): `(..., in_features)`, the layer's dtype.
        values (`torch.Tensor`): the kept values of S, 1-D row-major (`layer.weight`).
        bitmask (`torch.Tensor`): uint8 `(out_features, ceil(in_features / 8))` (`layer.weight_mask`).
        row_offsets (`torch.Tensor`): int64 `(out_features + 1,)`, start of each row's values.
        lowrank_u (`torch.Tensor`): `(out_features, rank)`; rank may be 0.
        lowrank_v (`torch.Tensor`): `(rank, in_features)`.
        bias (`torch.Tensor`, *optional*): `(out_features,)`.

    Returns:
        `torch.Tensor` of shape `(..., out_features)` in the dtype of `x`.
    """
    in_features = lowrank_v.shape[1]
    out_features = lowrank_u.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"`x` has {x.shape[-1]} features, the layer takes {in_features}.")
    _check(values, bitmask, row_offsets, out_features, in_features)
    flat = x.reshape(-1, in_features).contiguous()
    y = _kernels().decode(flat, values, bitmask, row_offsets, lowrank_u.contiguous(), lowrank_v.contiguous(), bias)
    return y.view(*x.shape[:-1], out_features)


def triton_decompress(
    values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Write S densely into `out` (`(out_features, in_features)`, unit column stride; every entry overwritten)."""
    out_features, in_features = out.shape
    if out.stride(1) != 1:
        raise ValueError("`out` must have unit column stride (e.g. a contiguous tensor or a row slice of one).")
    _check(values, bitmask, row_offsets, out_features, in_features)
    return _kernels().decompress(values, bitmask, row_offsets, out)


def workspace(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A dense `(out_features, in_features)` buffer shared by every layer of that shape on `device`.

    Prefill decompresses into it, so a model holds one transient dense matrix per distinct layer shape (four for
    a Llama block) instead of one per layer. Safe while calls on a device are ordered (one stream); free them
    with [`clear_workspaces`].
    """
    key = (torch.device(device), dtype, out_features, in_features)
    buffer = _workspaces.get(key)
    if buffer is None:
        buffer = _workspaces[key] = torch.empty(out_features, in_features, dtype=dtype, device=device)
    return buffer


def clear_workspaces() -> None:
    """Release the shared prefill workspaces (they are re-allocated on the next prefill)."""
    _workspaces.clear()


def _add_low_rank(y: torch.Tensor, x: torch.Tensor, lowrank_u: torch.Tensor, lowrank_v: torch.Tensor) -> torch.Tensor:
    if lowrank_u.shape[1] == 0:
        return y
    return y.addmm_(x @ lowrank_v.t(), lowrank_u.t())  # (x Vᵀ) Uᵀ: 2 r (d_in + d_out) FLOPs per token, no dense U V


def triton_prefill(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    lowrank_u: torch.Tensor,
    lowrank_v: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y = x (S + U V)ᵀ + b` for many tokens: S decompressed into the shared [`workspace`], then dense GEMMs."""
    out_features, in_features = lowrank_u.shape[0], lowrank_v.shape[1]
    dense = workspace(out_features, in_features, values.dtype, values.device)
    triton_decompress(values, bitmask, row_offsets, dense)
    flat = x.reshape(-1, in_features)
    y = _add_low_rank(F.linear(flat, dense, bias), flat, lowrank_u, lowrank_v)
    return y.view(*x.shape[:-1], out_features)


def is_two_four(bitmask: torch.Tensor, in_features: int) -> bool:
    """Whether the packed mask is 2:4 along each row (at most 2 kept in every group of 4 columns).

    One pass over the mask plus one host sync: the dispatch should cache it per layer (it changes with the mask).
    """
    if in_features % 4:
        return False
    return bool(_TWO_FOUR_BYTE.to(bitmask.device)[bitmask.long()].all())


def semi_structured_supported(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether PyTorch's semi-structured sparse GEMM can run this layer: CUDA with sparse tensor cores, fp16/bf16,
    S's rows a multiple of 32 and columns a multiple of 64 (torch's shape constraints), and no earlier failure."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in SEMI_STRUCTURED_DTYPES or device in _semi_structured_failed:
        return False
    rows, cols = SEMI_STRUCTURED_MULTIPLE
    if out_features % rows or in_features % cols:
        return False
    return torch.cuda.get_device_capability(device) >= SEMI_STRUCTURED_MIN_CAPABILITY


def choose_gpu_path(
    tokens: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    out_features: int,
    in_features: int,
    two_four: bool = False,
    prefer_semi_structured: bool = True,
) -> str:
    """The GPU path for one call: `"triton_decode"`, `"semi_structured"` or `"workspace"` (see module docstring).

    `two_four` is the layer's cached [`is_two_four`]; the semi-structured path is used for prefill only (its sparse
    GEMM pays off on compute-bound calls; decode is bound by bytes and the Triton kernel reads fewer).
    """
    if tokens <= GPU_MAX_DECODE_TOKENS:
        return "triton_decode"
    if two_four and prefer_semi_structured and semi_structured_supported(device, dtype, out_features, in_features):
        return "semi_structured"
    return "workspace"


_TWO_FOUR_ATTR = "_oats_two_four"  # plain attribute in the layer's __dict__: (cache key, bool)
_PATHS = {}  # filled below: path name of choose_gpu_path -> function


def layer_two_four(layer) -> bool:
    """[`is_two_four`] of a `LinearSparseLowRank`, cached on the layer until its mask changes (one sync per change)."""
    mask = layer.weight_mask
    key = (mask.data_ptr(), mask._version)
    cached = layer.__dict__.get(_TWO_FOUR_ATTR)
    if cached is None or cached[0] != key:
        cached = layer.__dict__[_TWO_FOUR_ATTR] = (key, is_two_four(mask, layer.in_features))
    return cached[1]


def layer_forward(layer, x: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
    """One call of a `LinearSparseLowRank` on the GPU, on the path [`choose_gpu_path`] picks for its token count.

    For the execution dispatch in `optimum_oats/nn`: call it when [`triton_available`]`(x)`, `x.dtype` is the
    layer's and no gradient is needed; `row_offsets` is the layer's cached offset table. Takes the layer
    duck-typed so this package does not import `optimum_oats.nn` (which imports it).
    """
    tokens = x.numel() // max(1, x.shape[-1])
    two_four = tokens > GPU_MAX_DECODE_TOKENS and layer_two_four(layer)
    path = choose_gpu_path(
        tokens,
        device=x.device,
        dtype=x.dtype,
        out_features=layer.out_features,
        in_features=layer.in_features,
        two_four=two_four,
    )
    return _PATHS[path](x, layer.weight, layer.weight_mask, row_offsets, layer.lowrank_u, layer.lowrank_v, layer.bias)


def semi_structured_prefill(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    lowrank_u: torch.Tensor,
    lowrank_v: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill of a 2:4 layer through `torch.sparse.to_sparse_semi_structured`; falls back to [`triton_prefill`].

    S is decompressed into the shared workspace and converted per call (two memory-bound passes), so nothing
    beyond the compact storage stays resident. A failure (e.g. cuSPARSELt missing from this torch build) is
    warned once per device and the workspace path is used from then on.
    """
    out_features, in_features = lowrank_u.shape[0], lowrank_v.shape[1]
    dense = workspace(out_features, in_features, values.dtype, values.device)
    triton_decompress(values, bitmask, row_offsets, dense)
    flat = x.reshape(-1, in_features)
    try:
        sparse = torch.sparse.to_sparse_semi_structured(dense)
        y = F.linear(flat, sparse, bias)
    except (RuntimeError, NotImplementedError) as err:
        _semi_structured_failed.add(values.device)
        warnings.warn(
            f"2:4 semi-structured sparse GEMM failed on {values.device} ({err}); using the dense workspace path.",
            RuntimeWarning,
            stacklevel=2,
        )
        y = F.linear(flat, dense, bias)
    y = _add_low_rank(y, flat, lowrank_u, lowrank_v)
    return y.view(*x.shape[:-1], out_features)


_PATHS.update(triton_decode=triton_forward, workspace=triton_prefill, semi_structured=semi_structured_prefill)

__all__ = [
    "GPU_MAX_DECODE_TOKENS",
    "choose_gpu_path",
    "clear_workspaces",
    "is_two_four",
    "layer_forward",
    "layer_two_four",
    "semi_structured_prefill",
    "semi_structured_supported",
    "triton_available",
    "triton_decompress",
    "triton_forward",
    "triton_prefill",
    "workspace",
]
