"""Group-wise round-to-nearest quantization of the kept values of S and of the factors U, V (pure tensor functions).

**Grid.** A `b`-bit code `q` in `[0, 2^b)` stands for `(q - z) · s` with `z = (2^b - 1) / 2`: symmetric, with
no level at zero (4 bits: `±0.5 s … ±7.5 s`). Zero needs no level because the bitmask already says which entries
are zero, and the kept values of a pruned row are the large ones, so a level spent on zero (GPTQ's integer grid)
would be wasted; it would also break the format, since a kept value that rounds to 0 would drop out of the mask.
The only per-group number is the fp16 scale `s`: no zero point. Measured by `benchmarks/quantize_grid.py` on
SmolLM2-135M's layers, magnitude-pruned to 40%, group 128 columns: the relative RTN error of the zero-free grid
against GPTQ's integer symmetric grid and the min-max asymmetric grid (fp16 zero point, 16 more bits a group) is
in that script's output and in BENCHMARKS.md; the zero-free grid was best at 3 and 4 bits, so asymmetric grids
and their zero points did not earn their bytes.

**Factors.** U and V are dense and their entries spread around zero like any dense weight, so they use the
grid *with* a zero level (`zero_level=True`, GPTQ's symmetric integer grid: codes `q - 2^(b-1)`), which also keeps
the exact zeros a factor may hold (the columns of dead inputs) representable.

**Scale.** Chosen per group from the group's kept values by a small grid search over clipping ratios
`s = ratio · max|w| / z` minimising the squared rounding error (GPTQ's `mse` option and AWQ's clip search do the
same); `ratio = 1` alone is plain min-max. Scales are rounded to fp16 before use, so what is stored is what was used.

**Groups.** A group is a run of `group_size` consecutive *input columns* of one row (as in GPTQ), and its scale is
computed over the kept values only. This works inside SparseGPT's column loop: the loop reaches a group's first
column with the group's mask already fixed (the mask is chosen per block of 128 columns, a multiple of the group)
and its values already carrying every earlier column's OBS update, so the scale is taken from the values that will
actually be rounded, as GPTQ does. Groups of consecutive *kept values* would cost the same bits per kept value on
average but would straddle the lazily-updated column blocks (their later values are not updated yet when the
group's first value is reached), and the scale of an entry would depend on the mask of the whole row before it.
The scale array is dense, `(rows, ceil(cols / group_size))`, whether or not a group keeps anything.

Zero stays zero: entries that are exactly 0 (pruned, or the kept weights of dead inputs) are never rounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Bit widths a value or factor may be stored with; 16 means "not quantized" (the model's float dtype).
VALUE_BITS = (3, 4, 6, 8, 16)
LOWRANK_BITS = (4, 8, 16)
NOT_QUANTIZED = 16
# Input columns per scale: 0.125 bits per weight for the fp16 scales; fits the rho = 0.3, 4-bit point under 4.25 bits.
DEFAULT_GROUP_SIZE = 128
SCALE_DTYPE = torch.float16
# Clipping ratios tried per group (1.0 first: plain min-max); the search costs `len(CLIP_RATIOS)` roundings.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 ... 0.6


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


def round_to_grid(values: torch.Tensor, scale: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """Nearest level `(q - z) s` of every entry, `scale` broadcast against `values`; exact zeros stay zero."""
    return dequantize_codes(quantize_codes(values, scale, spec), scale, spec) * (values != 0)


def quantize_codes(values: torch.Tensor, scale: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """Codes `round(w / s + z)` clamped to `[0, 2^b)`, as uint8 (the code of an exact zero is meaningless)."""
    codes = torch.round(values.float() / scale + spec.offset).clamp_(0, spec.max_code)
    return codes.to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """`(q - z) s` in float32: the one formula every path (algorithms, layer, reload) uses, so all agree exactly."""
    return (codes.float() - spec.offset) * scale


def best_scale(values: torch.Tensor, spec: GroupSpec, ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Per-row scale `(rows, 1)` of `values` `(rows, n)` minimising the squared error of its non-zeros.

    A row without non-zeros gets the smallest fp16 scale (it is stored, never used)."""
    values = values.float()
    peak = values.abs().amax(dim=1, keepdim=True)
    kept = values != 0
    best, best_error = None, None
    for ratio in ratios:
        scale = to_scale(peak * ratio / spec.top)
        error = ((round_to_grid(values, scale, spec) - values) * kept).square().sum(dim=1, keepdim=True)
        if best is None:
            best, best_error = scale, error
        else:
            better = error < best_error
            best = torch.where(better, scale, best)
            best_error = torch.where(better, error, best_error)
    return best


def group_scales(values: torch.Tensor, spec: GroupSpec, ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Scales `(rows, ceil(cols / group_size))` of a 2-D tensor, each from its group's non-zeros."""
    rows, cols = values.shape
    if cols == 0:
        return values.new_zeros(rows, 0, dtype=torch.float32)
    groups = range(0, cols, spec.group_size)
    return torch.cat([best_scale(values[:, start : start + spec.group_size], spec, ratios) for start in groups], dim=1)


def expand_scales(scales: torch.Tensor, cols: int, spec: GroupSpec) -> torch.Tensor:
    """`(rows, groups)` scales repeated to one per column, `(rows, cols)`."""
    return scales.repeat_interleave(spec.group_size, dim=1)[:, :cols]


def quantize_rtn(values: torch.Tensor, spec: GroupSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a 2-D tensor's non-zeros: `(on-grid float32 values, scales)`, zeros kept."""
    scales = group_scales(values, spec)
    return round_to_grid(values.float(), expand_scales(scales, values.shape[1], spec), spec), scales


def codes_of(values: torch.Tensor, scales: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """The uint8 codes `(rows, cols)` of on-grid values (as [`quantize_rtn`] or a quantizing pass returns them)."""
    return quantize_codes(values, expand_scales(scales.float(), values.shape[1], spec), spec)


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
