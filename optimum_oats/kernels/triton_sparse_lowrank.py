"""Triton kernels for `LinearSparseLowRank` on GPUs: decode straight from the compact storage, and decompression.

Imported only through [`optimum_oats.kernels.gpu`] (lazily, on a CUDA call), so the CPU build never needs Triton.
The kernels read the layer's storage exactly as saved: the kept values of S (1-D, row-major), the packed bitmask
(uint8 `(out, ceil(in / 8))`, little-endian within a byte), plus two tables derived from the mask and cached with it
(`operands.py`): the row offsets (int64 `(out + 1,)`) and each row's kept count before every `OFFSET_CHUNK`-column
chunk (int32 `(out, ceil(in / OFFSET_CHUNK))`). Quantized values are read as stored too ([`Codes`]): `BITS`-bit codes
(a uint8 little-endian bit stream, in the same order as float values) and fp16 scales per `GROUP` columns of a row;
a kept value's code is found from the same index as a float value's (its bits start at `index * BITS`: one byte,
or two when the code spans a byte boundary), and decoded to `(code - offset) * scale` in float32, the one formula of
`utils.quantization.dequantize_codes`. `BITS` is a `constexpr` (0: float values, the path compiled as before).

Per program: a block of `BLOCK_N` output rows and a range of columns (all of them, or one split of split-K), in
blocks of `BLOCK_K` (a multiple of `OFFSET_CHUNK`). A block's first value index comes from the tables, not from the
previous block, so the loads of successive blocks are independent and the loop is pipelined (`num_stages`). In a
block the mask bits are expanded, an exclusive prefix sum gives each kept weight's index into the row's values,
and the gather is a masked load. Products are accumulated in float32 whatever the storage dtype.

`triton.jit` decides when this module is imported whether its kernels compile for a GPU or run through Triton's
interpreter (`TRITON_INTERPRET=1`, read through `triton.knobs`); [`INTERPRETED`] records which. The CPU tests set
the variable before importing this module (tests/nn/test_triton_kernels.py).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .operands import OFFSET_CHUNK

# Decode configurations (BLOCK_N, BLOCK_K, warps, pipeline stages) tried by the autotuner on a GPU, keyed by shape and
# split (one-off cost per shape, a few ms). Every BLOCK_K is a multiple of `OFFSET_CHUNK`: a block starts on an entry
# of the per-chunk offset table, so no load depends on the previous block and the loop can be pipelined.
_DECODE_CONFIGS = [(16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 8, 3), (64, 128, 8, 2), (16, 256, 4, 4), (64, 64, 4, 3)]
_DECOMPRESS_CONFIGS = [(8, 256, 4, 1), (16, 256, 4, 1), (16, 512, 8, 1), (32, 256, 8, 1)]
# Under the interpreter (CPU tests) one small configuration, so odd shapes cross block and chunk edges.
_INTERPRET_DECODE = (16, 64, 1, 1)
_INTERPRET_DECOMPRESS = (8, 64, 1, 1)
DOT_MIN = 16  # tl.dot needs every dimension >= 16: tokens are padded to this when more than one


def interpreting() -> bool:
    """Whether kernels defined now run through Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRETED = interpreting()  # fixed at import, like every `triton.jit` kernel below


def _configs(table: list[tuple[int, ...]], interpreted: tuple[int, ...]) -> list[triton.Config]:
    sizes = [interpreted] if INTERPRETED else table
    assert all(k % OFFSET_CHUNK == 0 for _, k, _, _ in sizes)
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st) for n, k, w, st in sizes]


# Each split-K program covers a multiple of the widest column block, so its blocks never cross into the next split.
SPLIT_ALIGN = max(k for _, k, _, _ in ([_INTERPRET_DECODE] if INTERPRETED else _DECODE_CONFIGS))


# Sums go through tl.reduce / tl.associative_scan with this combine, and zeros through tl.full, not the library's
# tl.sum / tl.cumsum / tl.zeros: those are jitted when triton is first imported (in a test session by transformers,
# before the interpreter is switched on) and cannot run under the interpreter then. On a GPU both compile alike.
@triton.jit
def add(a, b):
    return a + b


@triton.jit
def expand_block(
    mask_ptr, values_ptr, scales_ptr, rows, row_ok, base, k0, k_end, mask_stride, scale_stride,
    BLOCK_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, OFFSET: tl.constexpr,
):  # fmt: skip
    """Dense `(BLOCK_N, BLOCK_K)` tile of S at columns `k0 + [0, BLOCK_K)` (those below `k_end`); `base` is each
    row's index of its first kept value at or after column `k0` (from the offset tables: no carried state).

    `BITS == 0`: the values are floats, returned in their dtype. Else `values_ptr` holds `BITS`-bit codes (uint8
    little-endian bit stream) and `scales_ptr` the fp16 scale of each `GROUP` columns of a row: kept value `k` is
    `(code_k - OFFSET) * scale` in float32 (`utils.quantization.dequantize_codes`), the tile is float32."""
    cols = k0 + tl.arange(0, BLOCK_K)
    ok = row_ok[:, None] & (cols < k_end)[None, :]
    # Each byte is read for its 8 columns: the repeats hit L1; the mask is 1/16 of the dense bf16 bytes.
    packed = tl.load(mask_ptr + rows[:, None].to(tl.int64) * mask_stride + (cols // 8)[None, :], mask=ok, other=0)
    bits = (packed.to(tl.int32) >> (cols % 8)[None, :]) & 1
    before = tl.associative_scan(bits, 1, add) - bits  # kept weights of the row earlier in this block
    kept = bits != 0
    if BITS == 0:
        tile = tl.load(values_ptr + base[:, None] + before, mask=kept, other=0.0)
    else:
        # Code k is bits [k * BITS, (k + 1) * BITS) of the stream: its first byte, and the next one when it spans two
        # (never for 2, 4 or 8 bits; a spanning code's bits are all stored). 64-bit math per row, 32-bit per value.
        start = base * BITS
        bit = (start & 7).to(tl.int32)[:, None] + before * BITS
        byte = (start >> 3)[:, None] + (bit >> 3)
        shift = bit & 7
        word = tl.load(values_ptr + byte, mask=kept, other=0).to(tl.int32)
        if 8 % BITS != 0:
            word = word | (tl.load(values_ptr + byte + 1, mask=kept & (shift + BITS > 8), other=0).to(tl.int32) << 8)
        code = (word >> shift) & ((1 << BITS) - 1)
        scale_row = scales_ptr + rows.to(tl.int64) * scale_stride
        if GROUP % BLOCK_K == 0:  # blocks start at multiples of BLOCK_K: the block is in one group, a scale per row
            scale = tl.load(scale_row + k0 // GROUP, mask=row_ok, other=0.0)[:, None]
        else:
            scale = tl.load(scale_row[:, None] + (cols // GROUP)[None, :], mask=kept, other=0.0)
        tile = tl.where(kept, (code.to(tl.float32) - OFFSET) * scale.to(tl.float32), 0.0)
    return tile


@triton.jit
def block_base(offsets_ptr, chunks_ptr, rows, row_ok, k0, chunk_stride, CHUNK: tl.constexpr):
    """Index into the values of each row's first kept weight at or after column `k0` (a multiple of CHUNK)."""
    start = tl.load(offsets_ptr + rows, mask=row_ok, other=0)
    before = tl.load(chunks_ptr + rows.to(tl.int64) * chunk_stride + k0 // CHUNK, mask=row_ok, other=0)
    return start + before.to(tl.int64)


@triton.autotune(
    configs=_configs(_DECODE_CONFIGS, _INTERPRET_DECODE),
    key=["N", "K", "R", "BLOCK_M", "SPLIT_K", "BITS"],
    reset_to_zero=["y_ptr"],
)
@triton.jit
def decode_kernel(
    x_ptr,
    values_ptr,
    scales_ptr,
    mask_ptr,
    offsets_ptr,
    chunks_ptr,
    t_ptr,
    u_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    R,
    mask_stride,
    chunk_stride,
    scale_stride,
    k_per_split,
    HAS_LOWRANK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT_K: tl.constexpr,
    CHUNK: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # y[m, n] = sum_k x[m, k] S[n, k] + sum_r t[m, r] U[n, r] + b[n], with t = x V^T computed beforehand. Program
    # (n, m, s) covers rows n, tokens m and columns [s * k_per_split, ...): with SPLIT_K > 1 the partial sums are
    # added atomically into a zeroed float32 y, and split 0 adds the low-rank term and the bias.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    toks = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_ok = toks < M
    split = tl.program_id(2)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        base = block_base(offsets_ptr, chunks_ptr, rows, row_ok, k0, chunk_stride, CHUNK)
        tile = expand_block(
            mask_ptr, values_ptr, scales_ptr, rows, row_ok, base, k0, k_end, mask_stride, scale_stride,
            BLOCK_K, BITS, GROUP, OFFSET,
        )  # fmt: skip
        cols = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + toks[None, :].to(tl.int64) * K + cols[:, None],
            mask=tok_ok[None, :] & (cols < k_end)[:, None],
            other=0.0,
        )  # (BLOCK_K, BLOCK_M): x transposed
        if BLOCK_M == 1:
            acc += tl.reduce(tile.to(tl.float32) * tl.reshape(xt.to(tl.float32), (1, BLOCK_K)), 1, add)[:, None]
        elif DOT_FP32:  # the interpreter's bf16 dot is wrong; a GPU never takes this branch for bf16/fp16
            acc += tl.dot(tile.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:  # quantized: the fp32 tile rounded to the dtype of x, as the PyTorch path rounds S
            acc += tl.dot(tile.to(xt.dtype), xt)
    if split == 0:
        if HAS_LOWRANK:
            for r0 in range(0, R, BLOCK_R):
                ranks = r0 + tl.arange(0, BLOCK_R)
                r_ok = ranks < R
                # other=0 on every masked load: without it masked-off lanes are undefined on a GPU (zeros only in
                # the interpreter), and padding ranks would add garbage.
                u = tl.load(
                    u_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :],
                    mask=row_ok[:, None] & r_ok[None, :],
                    other=0.0,
                )
                tt = tl.load(
                    t_ptr + toks[None, :] * R + ranks[:, None], mask=tok_ok[None, :] & r_ok[:, None], other=0.0
                )
                if BLOCK_M == 1:
                    acc += tl.reduce(u.to(tl.float32) * tl.reshape(tt.to(tl.float32), (1, BLOCK_R)), 1, add)[:, None]
                else:  # products in fp32 (small: rank x tokens per row)
                    acc += tl.dot(u.to(tl.float32), tt.to(tl.float32), input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out = y_ptr + toks[None, :].to(tl.int64) * N + rows[:, None]
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & tok_ok[None, :])
    else:
        tl.atomic_add(out, acc, mask=row_ok[:, None] & tok_ok[None, :])


@triton.autotune(configs=_configs(_DECOMPRESS_CONFIGS, _INTERPRET_DECOMPRESS), key=["N", "K", "BITS"])
@triton.jit
def decompress_kernel(
    values_ptr,
    scales_ptr,
    mask_ptr,
    offsets_ptr,
    chunks_ptr,
    out_ptr,
    N,
    K,
    mask_stride,
    chunk_stride,
    scale_stride,
    out_stride,
    CHUNK: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Program (n, k) overwrites one (BLOCK_N, BLOCK_K) block: pruned entries are written as zeros, no memset
    # needed, and the offset tables give each block its start, so all blocks run in parallel.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    k0 = tl.program_id(1) * BLOCK_K
    base = block_base(offsets_ptr, chunks_ptr, rows, row_ok, k0, chunk_stride, CHUNK)
    tile = expand_block(
        mask_ptr, values_ptr, scales_ptr, rows, row_ok, base, k0, K, mask_stride, scale_stride, BLOCK_K, BITS, GROUP,
        OFFSET,
    )  # fmt: skip
    cols = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + rows[:, None].to(tl.int64) * out_stride + cols[None, :]
    tl.store(out, tile.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < K)[None, :])


class Codes(NamedTuple):
    """Quantized values: `values` holds `bits`-bit codes (module docstring), `scales` the fp16 scale of each
    `group_size` columns of a row `(out, ceil(in / group_size))`; value = `(code - offset) * scale` in float32."""

    scales: torch.Tensor
    bits: int
    group_size: int
    offset: float


def _code_args(values: torch.Tensor, codes: Codes | None) -> tuple[torch.Tensor, int, dict]:
    """The scales pointer, its row stride and the constexprs `BITS`, `GROUP`, `OFFSET` (`BITS=0`: float values, the
    scales pointer unused)."""
    if codes is None:
        return values, 0, {"BITS": 0, "GROUP": 1, "OFFSET": 0.0}
    scales = codes.scales
    if values.dtype != torch.uint8 or scales.dtype != torch.float16 or not 2 <= codes.bits <= 8:
        raise ValueError(
            f"expected uint8 codes of 2-8 bits, fp16 scales; got {values.dtype}, {scales.dtype}, {codes.bits}."
        )
    return scales, scales.stride(0), {"BITS": codes.bits, "GROUP": codes.group_size, "OFFSET": float(codes.offset)}


def _block_m(tokens: int) -> int:
    return 1 if tokens == 1 else max(DOT_MIN, min(triton.next_power_of_2(tokens), 64))


def split_k_for(tokens: int, out_features: int, in_features: int, device: torch.device) -> int:
    """How many programs share each row block's columns (split-K): enough for ~2 programs per SM when the row and
    token blocks alone leave the GPU idle (a 1024-row k/v projection is 32 blocks of 32 rows on 132 SMs), keeping
    at least 1024 columns per program. 1 off a GPU."""
    device = torch.device(device)
    if INTERPRETED or device.type != "cuda":
        return 1
    programs = triton.cdiv(out_features, 32) * triton.cdiv(tokens, _block_m(tokens))
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split = 1
    while programs * split < target and in_features >= 2 * split * 1024:
        split *= 2
    return split


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def decode(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    chunk_offsets: torch.Tensor,
    lowrank_u: torch.Tensor,
    lowrank_v: torch.Tensor,
    bias: torch.Tensor | None,
    split_k: int | None = None,
    codes: Codes | None = None,
) -> torch.Tensor:
    """`x (S + U V)^T + b` for `x` `(M, K)` contiguous, S read from values + bitmask (see module docstring).

    `split_k` programs share each row block's columns ([`split_k_for`] when None); their float32 partial sums are
    added atomically, then rounded to the dtype of `x`. With `codes`, `values` holds quantized codes (see [`Codes`]).
    """
    tokens, in_features = x.shape
    out_features, rank = lowrank_u.shape
    split = split_k_for(tokens, out_features, in_features, x.device) if split_k is None else split_k
    per_split = triton.cdiv(triton.cdiv(in_features, split), SPLIT_ALIGN) * SPLIT_ALIGN
    split = max(1, triton.cdiv(in_features, per_split))
    if split > 1:
        y = torch.zeros(tokens, out_features, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    if tokens == 0 or out_features == 0:
        return y.to(x.dtype)
    # The low-rank input t = x V^T is tiny (tokens x rank): one cuBLAS call in the model dtype (fp32 accumulate,
    # rounded like the PyTorch reference path), added to the sparse product in the kernel's fp32 epilogue.
    t = torch.mm(x, lowrank_v.t()) if rank else y
    block_m = _block_m(tokens)
    grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(tokens, block_m), split)  # noqa: E731
    scales, scale_stride, meta = _code_args(values, codes)
    decode_kernel[grid](
        x,
        values,
        scales,
        bitmask,
        row_offsets,
        chunk_offsets,
        t,
        lowrank_u if rank else y,
        bias if bias is not None else y,
        y,
        tokens,
        out_features,
        in_features,
        rank,
        bitmask.shape[1],
        chunk_offsets.shape[1],
        scale_stride,
        per_split,
        HAS_LOWRANK=rank > 0,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        DOT_FP32=INTERPRETED or x.dtype == torch.float32,
        BLOCK_R=max(DOT_MIN, min(triton.next_power_of_2(max(rank, 1)), 64)),
        SPLIT_K=split,
        CHUNK=OFFSET_CHUNK,
        **meta,
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)


def decompress(
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    chunk_offsets: torch.Tensor,
    out: torch.Tensor,
    codes: Codes | None = None,
) -> torch.Tensor:
    """Write S densely into `out` `(N, K)` (row stride may exceed K; column stride must be 1); returns `out`.
    With `codes`, `values` holds quantized codes (see [`Codes`]), decoded in float32 then rounded to `out`'s dtype."""
    out_features, in_features = out.shape
    if out_features == 0 or in_features == 0:
        return out
    grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(in_features, meta["BLOCK_K"]))  # noqa: E731
    scales, scale_stride, meta = _code_args(values, codes)
    decompress_kernel[grid](
        values,
        scales,
        bitmask,
        row_offsets,
        chunk_offsets,
        out,
        out_features,
        in_features,
        bitmask.shape[1],
        chunk_offsets.shape[1],
        scale_stride,
        out.stride(0),
        CHUNK=OFFSET_CHUNK,
        **meta,
    )
    return out
