"""Group-wise round-to-nearest quantization of the kept values of S and of the factors U, V (pure tensor functions).

**Grid.** A `b`-bit code `q` in `[0, 2^b)` stands for `(q - z) · s` with `z = (2^b - 1) / 2`: symmetric, with
no level at zero (4 bits: `±0.5 s … ±7.5 s`). Zero needs no level because the bitmask already says which entries
are zero, and the kept values of a pruned row are the large ones, so a level spent on zero (GPTQ's integer grid)
would be wasted; it would also break the format, since a kept value that rounds to 0 would drop out of the mask.
The only per-group number is the fp16 scale `s`: no zero point. `benchmarks/quantize_grid.py` measured the relative
RTN error of SmolLM2-135M's kept values (every block layer magnitude-pruned to 40%): at equal bytes (a zero point
costs a second fp16 number, so asymmetric groups twice as wide), min-max asymmetric beat min-max zero-free by 1-3%
(3 bits: 0.192 vs 0.197; 4 bits: 0.088 vs 0.089), and the clip search below gave zero-free 10-16% (0.166; 0.081).
The integer grid with a zero level was worst (0.232; 0.099). An asymmetric grid with its own clip search was not
measured, so zero points are left out until they are shown to earn their 16 bits.

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

import torch

from ..utils.quantization import (
    DEFAULT_GROUP_SIZE,
    LOWRANK_BITS,
    NOT_QUANTIZED,
    SCALE_DTYPE,
    VALUE_BITS,
    GroupSpec,
    dequantize_codes,
    expand_scales,
    pack_codes,
    packed_bytes,
    quantize_codes,
    to_scale,
    unpack_codes,
)

__all__ = [
    "CLIP_RATIOS",
    "DEFAULT_GROUP_SIZE",
    "LOWRANK_BITS",
    "NOT_QUANTIZED",
    "SCALE_DTYPE",
    "VALUE_BITS",
    "GroupSpec",
    "best_scale",
    "codes_of",
    "dequantize_codes",
    "expand_scales",
    "group_scales",
    "pack_codes",
    "packed_bytes",
    "quantize_codes",
    "quantize_rows_int8",
    "quantize_rtn",
    "round_to_grid",
    "to_scale",
    "unpack_codes",
]

# Clipping ratios tried per group (1.0 first: plain min-max); the search costs `len(CLIP_RATIOS)` roundings.
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(17))  # 1.0 ... 0.6


def round_to_grid(values: torch.Tensor, scale: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """Nearest level `(q - z) s` of every entry, `scale` broadcast against `values`; exact zeros stay zero."""
    return dequantize_codes(quantize_codes(values, scale, spec), scale, spec) * (values != 0)


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


def quantize_rtn(values: torch.Tensor, spec: GroupSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a 2-D tensor's non-zeros: `(on-grid float32 values, scales)`, zeros kept."""
    scales = group_scales(values, spec)
    return round_to_grid(values.float(), expand_scales(scales, values.shape[1], spec), spec), scales


def codes_of(values: torch.Tensor, scales: torch.Tensor, spec: GroupSpec) -> torch.Tensor:
    """The uint8 codes `(rows, cols)` of on-grid values (as [`quantize_rtn`] or a quantizing pass returns them)."""
    return quantize_codes(values, expand_scales(scales.float(), values.shape[1], spec), spec)


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 codes `(rows, cols)` and fp16-exact float32 scales `(rows,)` of a dense table, one scale per row
    (the grid with a zero level, its scale by the same clip search): for the token embedding and tied LM head."""
    spec = GroupSpec(8, max(1, weight.shape[1]), zero_level=True)
    scales = group_scales(weight.float(), spec)
    codes = quantize_codes(weight.float(), expand_scales(scales, weight.shape[1], spec), spec)
    return (codes.to(torch.int16) - int(spec.offset)).to(torch.int8), scales[:, 0]
