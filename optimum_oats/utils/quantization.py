"""The storage format of quantized values and factors, shared by the algorithms that produce it and the layer that
decodes it: `b`-bit codes on a symmetric grid, fp16 group scales, codes packed into a little-endian bit stream.

The grids and why they were chosen are described in `optimum_oats.algorithms.quantize`; this module holds only
what both sides must compute identically (the decode formula is one function, so every path agrees bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Bit widths a value or factor may be stored with; 16 means "not quantized" (the model's float dtype).
VALUE_BITS = (3, 4, 6, 8, 16)
LOWRANK_BITS = (4, 8, 16)
# The token embedding (and a head tied to it): int8 rows or not quantized (optimum_oats/nn/quantized_embedding.py).
EMBEDDING_BITS = (8, 16)
NOT_QUANTIZED = 16
# Input columns per scale: 0.125 bits per weight for the fp16 scales; fits the rho = 0.3, 4-bit point under 4.25 bits.
DEFAULT_GROUP_SIZE = 128
SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class GroupSpec:
    """How one tensor is quantized: `bits` per code, scales per `group_size` consecutive columns of a row;
    `zero_level` picks the grid with a level at 0 (for the dense factors) instead of the zero-free one."""

    bits: int
    group_size: int
    zero_level: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"`bits` must be in [2, 8] to quantize, got {self.bits}.")
        if self.group_size < 1:
            raise ValueError(f"`group_size` must be >= 1, got {self.group_size}.")

    @property
    def offset(self) -> float:
        """`z`, the code of value 0: between two codes on the zero-free grid, code `2^(b-1)` with a zero level."""
        return float(2 ** (self.bits - 1)) if self.zero_level else (2**self.bits - 1) / 2

    @property
    def top(self) -> float:
        """The largest positive level in units of the scale (what the peak of a group is mapped to)."""
        return self.max_code - self.offset

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    def num_groups(self, cols: int) -> int:
        return math.ceil(cols / self.group_size)


def to_scale(scale: torch.Tensor) -> torch.Tensor:
    """A float32 scale rounded to what is stored (fp16, clamped to its normal range so it never becomes 0/inf)."""
    finfo = torch.finfo(SCALE_DTYPE)
    return scale.clamp(finfo.tiny, finfo.max).to(SCALE_DTYPE).float()


def quantize_codes(values: torch.Tensor, scale: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """Codes `round(w / s + z)` clamped to `[0, 2^b)`, as uint8 (the code of an exact zero is meaningless)."""
    codes = torch.round(values.float() / scale + spec.offset).clamp_(0, spec.max_code)
    return codes.to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """`(q - z) s` in float32: the one formula every path (algorithms, layer, reload) uses, so all agree exactly."""
    return (codes.float() - spec.offset) * scale


def expand_scales(scales: torch.Tensor, cols: int, spec: GroupSpec) -> torch.Tensor:
    """`(rows, groups)` scales repeated to one per column, `(rows, cols)`."""
    return scales.repeat_interleave(spec.group_size, dim=1)[:, :cols]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of `bits`-bit codes into a little-endian bit stream, uint8 `(ceil(n · bits / 8),)`.

    4 bits: two codes a byte, the first in the low nibble; 3 bits: eight codes in three bytes; 8 bits: as is."""
    if bits == 8:
        return codes.to(torch.uint8).flatten().clone()
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.flatten().long().unsqueeze(1) >> shifts) & 1).flatten()
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = 1 << torch.arange(8, device=codes.device)
    packed = (stream.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of [`pack_codes`]: the first `count` codes as uint8 `(count,)`."""
    if bits == 8:
        return packed[:count].clone()
    stream = (packed.long().unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.flatten()[: count * bits].view(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(dim=1).to(torch.uint8)


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` packed `bits`-bit codes."""
    return math.ceil(count * bits / 8)
