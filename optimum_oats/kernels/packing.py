"""Packed bitmask storage of a sparsity pattern: 1 bit per weight, row-major, little-endian within a byte.

Values are kept separately in the same row-major order, so `values` + `bitmask` is a complete, compact and
dtype-independent encoding (safetensors stores only dense tensors). At 50% compression a bitmask costs
1/8 byte per weight, far below an int16/int32 index per kept weight.
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = [1 << i for i in range(8)]


def packed_columns(in_features: int) -> int:
    """Bytes per row of a packed mask."""
    return (in_features + 7) // 8


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool `(rows, cols)` mask into uint8 `(rows, ceil(cols / 8))`."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, packed_columns(cols) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (padded.view(rows, -1, 8) * weights).sum(dim=-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of [`pack_bitmask`]: uint8 `(rows, ceil(cols / 8))` to bool `(rows, cols)`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(packed.shape[0], -1)[:, :cols].bool()


_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)


def row_counts(packed: torch.Tensor) -> torch.Tensor:
    """Kept weights per row of a packed mask, int64 `(rows,)` (padding bits included, so a damaged mask shows)."""
    return _POPCOUNT.to(packed.device)[packed.long()].sum(dim=1)


def padding_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Set bits past column `cols` in each row, int64 `(rows,)`: always 0 in a mask written by [`pack_bitmask`].

    [`unpack_bitmask`] drops these bits, so a kept bit moved into the padding would shift every later value of
    the row by one place while the total count stays right.
    """
    pad = packed_columns(cols) * 8 - cols
    if pad == 0 or packed.shape[1] == 0:
        return torch.zeros(packed.shape[0], dtype=torch.int64, device=packed.device)
    return _POPCOUNT.to(packed.device)[(packed[:, -1] >> (8 - pad)).long()]


def group_counts(packed: torch.Tensor, cols: int, m: int) -> torch.Tensor:
    """Kept weights in each group of `m` consecutive columns, int64 `(rows, cols // m)` (`cols` divisible by `m`)."""
    return unpack_bitmask(packed, cols).view(packed.shape[0], cols // m, m).sum(dim=-1)
