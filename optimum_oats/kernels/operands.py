"""What the kernels take: a compressed linear layer's stored tensors as one typed tuple, and the tables derived from
its mask (cached with the mask, so every path and the `torch.library` op find the same ones).

[`PackedWeights`] is the layer's storage exactly as saved, nothing derived. The offset tables are looked up inside
the kernels' entry points from the mask itself ([`row_offsets`], [`chunk_offsets`]): they are keyed by the mask
tensor's identity, storage address and version counter, so an in-place change of the mask (loading a checkpoint)
rebuilds them, and they are freed with the mask (a weak reference's callback). A lookup is one dict access and a
few attribute reads: it runs on every decode call of every layer.

Quantized values are read as stored too: `values` then holds their packed `b`-bit codes (uint8 bit stream) and
`value_scales` their fp16 group scales, and every path decodes them where it reads them (no float copy is kept).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..utils.quantization import NOT_QUANTIZED, SCALE_DTYPE, GroupSpec, packed_bytes
from .packing import row_counts

# Columns per entry of [`chunk_offsets`]: every column block of the Triton decode kernel is a multiple of it.
OFFSET_CHUNK = 64


class PackedWeights(NamedTuple):
    """A `LinearSparseLowRank`'s storage as the kernels read it: `y = x (S + U V)ᵀ + b`.

    Fields:
        values: the kept values of S, 1-D, row-major (`layer.weight`); quantized: their packed codes, uint8
            `(ceil(nnz * value_bits / 8),)` (`layer.weight_codes`, see `utils.quantization.pack_codes`).
        mask: packed bitmask of S, uint8 `(out_features, ceil(in_features / 8))`, little-endian in a byte.
        lowrank_u: `(out_features, rank)`; rank may be 0.
        lowrank_v: `(rank, in_features)`.
        bias: `(out_features,)` or None.
        value_scales: quantized only: the fp16 scale of each `group_size` columns of a row, stored as int16 bit
            patterns `(out_features, ceil(in_features / group_size))`; None for float values.
        value_bits: bits per code (16: float values).
        group_size: columns per scale (quantized only).
    """

    values: torch.Tensor
    mask: torch.Tensor
    lowrank_u: torch.Tensor
    lowrank_v: torch.Tensor
    bias: torch.Tensor | None
    value_scales: torch.Tensor | None = None
    value_bits: int = NOT_QUANTIZED
    group_size: int = 0

    @property
    def quantized(self) -> bool:
        return self.value_scales is not None

    @property
    def dtype(self) -> torch.dtype:
        """The layer's compute dtype (of the float values, else of the factors, which are floats in memory)."""
        return self.lowrank_u.dtype if self.quantized else self.values.dtype

    @property
    def value_spec(self) -> GroupSpec | None:
        return GroupSpec(self.value_bits, self.group_size) if self.quantized else None

    def value_offsets(self) -> torch.Tensor:
        """[`row_offsets`] of this storage: start of each row's kept values (in values, or in codes)."""
        if self.quantized:
            return row_offsets(self.mask, self.values.numel(), self.value_bits)
        return row_offsets(self.mask, self.values.numel())

    def scales_float(self) -> torch.Tensor:
        """The value scales as float32 `(out_features, groups)` (quantized only)."""
        return self.value_scales.view(SCALE_DTYPE).float()

    @property
    def in_features(self) -> int:
        return self.lowrank_v.shape[1]

    @property
    def out_features(self) -> int:
        return self.lowrank_u.shape[0]

    @property
    def rank(self) -> int:
        return self.lowrank_u.shape[1]


_BYTE_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64)
# Bytes whose two nibbles each hold at most 2 set bits: a 2:4 pattern on columns (4j, 4j + 4).
_TWO_FOUR_BYTE = torch.tensor([bin(b & 15).count("1") <= 2 and bin(b >> 4).count("1") <= 2 for b in range(256)])

# Per table: id(mask) -> (weak reference to the mask, (data_ptr, version, extra), value).
_Cache = dict[int, tuple[weakref.ref, tuple, object]]
_ROW_OFFSETS: _Cache = {}
_CHUNK_OFFSETS: _Cache = {}
_TWO_FOUR: _Cache = {}


def _cached(cache: _Cache, mask: torch.Tensor, extra: object, build: Callable[[], object]) -> object:
    """`build()` for this mask, reused until the mask's storage or version changes; dropped when the mask dies."""
    key = (mask.data_ptr(), mask._version, extra)
    entry = cache.get(id(mask))
    if entry is not None and entry[1] == key and entry[0]() is mask:
        return entry[2]
    value = build()
    ident = id(mask)

    def forget(ref: weakref.ref, ident: int = ident) -> None:
        if cache.get(ident, (None,))[0] is ref:
            del cache[ident]

    cache[ident] = (weakref.ref(mask, forget), key, value)
    return value


def _kept_per_byte(mask: torch.Tensor) -> torch.Tensor:
    return _BYTE_POPCOUNT.to(mask.device)[mask.long()]


def row_offsets(mask: torch.Tensor, stored: int, bits: int | None = None) -> torch.Tensor:
    """Start of each row's kept values, int64 `(out_features + 1,)`; cached until the mask changes.

    `stored` is the number of stored values, or with `bits` the bytes of their packed `bits`-bit codes.

    Raises:
        ValueError: the mask marks another number of kept weights than the storage holds.
    """
    return _cached(_ROW_OFFSETS, mask, (stored, bits), lambda: _build_row_offsets(mask, stored, bits))


def _build_row_offsets(mask: torch.Tensor, stored: int, bits: int | None) -> torch.Tensor:
    counts = row_counts(mask)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    kept = int(offsets[-1])
    if bits is None and kept != stored:
        raise ValueError(
            f"`weight_mask` marks {kept} kept weights but `weight` holds {stored}: the layer's storage is "
            "inconsistent (a corrupted or mismatched checkpoint)."
        )
    if bits is not None and packed_bytes(kept, bits) != stored:
        raise ValueError(
            f"`weight_mask` marks {kept} kept weights ({packed_bytes(kept, bits)} bytes of {bits}-bit codes) but "
            f"`weight_codes` holds {stored} bytes: the layer's storage is inconsistent (a corrupted or mismatched "
            "checkpoint)."
        )
    return offsets


def chunk_offsets(mask: torch.Tensor, chunk: int = OFFSET_CHUNK) -> torch.Tensor:
    """Kept weights of each row before each `chunk`-column block, int32 `(out_features, ceil(in / chunk))`.

    With [`row_offsets`] it gives every column block's first value directly, so the decode kernel's loads do not
    depend on the previous block (they can be pipelined) and the columns can be split between programs (split-K).
    4 bytes per `chunk` columns: 1/32 of the dense bf16 bytes at the default chunk of 64 columns.
    """
    if chunk % 8:
        raise ValueError(f"`chunk` must be a multiple of 8 (whole mask bytes), got {chunk}.")
    return _cached(_CHUNK_OFFSETS, mask, chunk, lambda: _build_chunk_offsets(mask, chunk))


def _build_chunk_offsets(mask: torch.Tensor, chunk: int) -> torch.Tensor:
    per_byte = _kept_per_byte(mask)
    rows, width = per_byte.shape
    blocks = -(-width // (chunk // 8))
    padded = torch.nn.functional.pad(per_byte, (0, blocks * (chunk // 8) - width))
    per_block = padded.view(rows, blocks, chunk // 8).sum(dim=2)
    return (per_block.cumsum(dim=1) - per_block).to(torch.int32).contiguous()


def is_two_four(mask: torch.Tensor, in_features: int) -> bool:
    """Whether the packed mask is 2:4 along each row (at most 2 kept in every group of 4 columns); cached until the
    mask changes (one pass over the mask and one host sync per change)."""
    return _cached(
        _TWO_FOUR,
        mask,
        in_features,
        lambda: in_features % 4 == 0 and bool(_TWO_FOUR_BYTE.to(mask.device)[mask.long()].all()),
    )


__all__ = ["OFFSET_CHUNK", "PackedWeights", "chunk_offsets", "is_two_four", "row_offsets"]
