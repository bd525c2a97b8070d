"""Triton kernels for `LinearSparseLowRank` on GPUs: decode straight from the compact storage, and decompression.

Imported only through [`optimum_oats.kernels.gpu`] (lazily, on a CUDA call), so the CPU build never needs Triton.
The kernels read the layer's storage exactly as saved: the kept values of S (1-D, row-major), the packed bitmask
(uint8 `(out, ceil(in / 8))`, little-endian within a byte) and the row offsets (int64 `(out + 1,)`, from popcounts).

Per program: a block of `BLOCK_N` output rows; a loop over the columns in chunks of `BLOCK_K`. For each chunk the
mask bits are expanded, an exclusive prefix sum along the chunk gives each kept weight's index into the row's
values (`row_offset + kept_before_chunk + prefix`), and the gather is a masked load. Products are accumulated in
float32 whatever the storage dtype.

`triton.jit` decides when this module is imported whether its kernels compile for a GPU or run through Triton's
interpreter (`TRITON_INTERPRET=1`, read through `triton.knobs`); [`INTERPRETED`] records which. The CPU tests set
the variable before importing this module (tests/nn/test_triton_kernels.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Decode configurations tried by the autotuner on a GPU, keyed by shape (one-off cost per shape, a few ms).
_DECODE_CONFIGS = [(16, 128, 4), (32, 128, 4), (32, 256, 8), (64, 128, 8), (16, 256, 4), (64, 64, 4)]
_DECOMPRESS_CONFIGS = [(8, 256, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8)]
# Under the interpreter (CPU tests) one small configuration, so odd shapes cross block and chunk edges.
_INTERPRET_DECODE = (16, 64, 1)
_INTERPRET_DECOMPRESS = (8, 64, 1)
DOT_MIN = 16  # tl.dot needs every dimension >= 16: tokens are padded to this when more than one


def interpreting() -> bool:
    """Whether kernels defined now run through Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETED = interpreting()  # fixed at import, like every `triton.jit` kernel below


def _configs(table: list[tuple[int, int, int]], interpreted: tuple[int, int, int]) -> list[triton.Config]:
    sizes = [interpreted] if INTERPRETED else table
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in sizes]


# Sums go through tl.reduce / tl.associative_scan with this combine, and zeros through tl.full, not the library's
# tl.sum / tl.cumsum / tl.zeros: those are jitted when triton is first imported (in a test session by transformers,
# before the interpreter is switched on) and cannot run under the interpreter then. On a GPU both compile alike.
@triton.jit
def add(a, b):
    return a + b


@triton.jit
def expand_chunk(mask_ptr, values_ptr, rows, row_ok, base, k0, K, mask_stride, BLOCK_K: tl.constexpr):
    """Dense `(BLOCK_N, BLOCK_K)` tile of S at columns `k0 + [0, BLOCK_K)`, and each row's kept count in it."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ok = row_ok[:, None] & col_ok[None, :]
    # Each byte is read for its 8 columns: the repeats hit L1; the mask is 1/16 of the dense bf16 bytes.
    packed = tl.load(mask_ptr + rows[:, None].to(tl.int64) * mask_stride + (cols // 8)[None, :], mask=ok, other=0)
    bits = (packed.to(tl.int32) >> (cols % 8)[None, :]) & 1
    before = tl.associative_scan(bits, 1, add) - bits  # kept weights of the row earlier in this chunk
    tile = tl.load(values_ptr + base[:, None] + before, mask=bits != 0, other=0.0)
    return tile, tl.reduce(bits, 1, add)


@triton.autotune(configs=_configs(_DECODE_CONFIGS, _INTERPRET_DECODE), key=["N", "K", "R", "BLOCK_M"])
@triton.jit
def decode_kernel(
    x_ptr,
    values_ptr,
    mask_ptr,
    offsets_ptr,
    t_ptr,
    u_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    mask_stride,
    HAS_LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # y[m, n] = sum_k x[m, k] S[n, k] + sum_r t[m, r] U[n, r] + b[n], with t = x V^T computed beforehand.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    toks = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_ok = toks < M
    base = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        tile, kept = expand_chunk(mask_ptr, values_ptr, rows, row_ok, base, k0, K, mask_stride, BLOCK_K)
        base += kept
        cols = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + toks[None, :].to(tl.int64) * K + cols[:, None],
            mask=tok_ok[None, :] & (cols < K)[:, None],
            other=0.0,
        )  # (BLOCK_K, BLOCK_M): x transposed
        if BLOCK_M == 1:
            acc += tl.reduce(tile.to(tl.float32) * tl.reshape(xt.to(tl.float32), (1, BLOCK_K)), 1, add)[:, None]
        elif DOT_FP32:  # the interpreter's bf16 dot is wrong; a GPU never takes this branch for bf16/fp16
            acc += tl.dot(tile.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(tile, xt)
    if HAS_LOWRANK:
        for r0 in range(0, R, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            r_ok = ranks < R
            # other=0 on every masked load: without it masked-off lanes are undefined on a GPU (zeros only in the
            # interpreter), and padding ranks would add garbage.
            u = tl.load(
                u_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :],
                mask=row_ok[:, None] & r_ok[None, :],
                other=0.0,
            )
            tt = tl.load(t_ptr + toks[None, :] * R + ranks[:, None], mask=tok_ok[None, :] & r_ok[:, None], other=0.0)
            if BLOCK_M == 1:
                acc += tl.reduce(u.to(tl.float32) * tl.reshape(tt.to(tl.float32), (1, BLOCK_R)), 1, add)[:, None]
            else:  # products in fp32 (small: rank x tokens per row)
                acc += tl.dot(u.to(tl.float32), tt.to(tl.float32), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + toks[None, :].to(tl.int64) * N + rows[:, None]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & tok_ok[None, :])


@triton.autotune(configs=_configs(_DECOMPRESS_CONFIGS, _INTERPRET_DECOMPRESS), key=["N", "K"])
@triton.jit
def decompress_kernel(
    values_ptr,
    mask_ptr,
    offsets_ptr,
    out_ptr,
    N,
    K,
    mask_stride,
    out_stride,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # A full overwrite of rows [pid * BLOCK_N, ...): pruned entries are written as zeros, no memset needed.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    base = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    for k0 in range(0, K, BLOCK_K):
        tile, kept = expand_chunk(mask_ptr, values_ptr, rows, row_ok, base, k0, K, mask_stride, BLOCK_K)
        base += kept
        cols = k0 + tl.arange(0, BLOCK_K)
        out = out_ptr + rows[:, None].to(tl.int64) * out_stride + cols[None, :]
        tl.store(out, tile.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < K)[None, :])


def _block_m(tokens: int) -> int:
    return 1 if tokens == 1 else max(DOT_MIN, min(triton.next_power_of_2(tokens), 64))


def decode(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    lowrank_u: torch.Tensor,
    lowrank_v: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`x (S + U V)^T + b` for `x` `(M, K)` contiguous, S read from values + bitmask (see module docstring)."""
    tokens, in_features = x.shape
    out_features, rank = lowrank_u.shape
    y = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    if tokens == 0 or out_features == 0:
        return y
    # The low-rank input t = x V^T is tiny (tokens x rank): one cuBLAS call in the model dtype (fp32 accumulate,
    # rounded like the PyTorch reference path), added to the sparse product in the kernel's fp32 epilogue.
    t = torch.mm(x, lowrank_v.t()) if rank else y
    block_m = _block_m(tokens)
    grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(tokens, block_m))  # noqa: E731
    decode_kernel[grid](
        x,
        values,
        bitmask,
        row_offsets,
        t,
        lowrank_u if rank else y,
        bias if bias is not None else y,
        y,
        tokens,
        out_features,
        in_features,
        rank,
        bitmask.shape[1],
        HAS_LOWRANK=rank > 0,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        DOT_FP32=INTERPRETED or x.dtype == torch.float32,
        BLOCK_R=max(DOT_MIN, min(triton.next_power_of_2(max(rank, 1)), 64)),
    )
    return y


def decompress(
    values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """Write S densely into `out` `(N, K)` (row stride may exceed K; column stride must be 1); returns `out`."""
    out_features, in_features = out.shape
    if out_features == 0 or in_features == 0:
        return out
    grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]),)  # noqa: E731
    decompress_kernel[grid](
        values, bitmask, row_offsets, out, out_features, in_features, bitmask.shape[1], out.stride(0)
    )
    return out
