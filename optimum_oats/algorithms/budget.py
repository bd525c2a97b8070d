"""How many parameters each part of a compressed layer may keep (OATS paper, Sec. 3: the ρ/κ budget rule)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..utils.counting import counted_parameters
from .quantize import GroupSpec


@dataclass(frozen=True)
class LayerBudget:
    """Rank of the low-rank term and entries kept per row by the sparse term."""

    rank: int
    keep_per_row: int
    nm: tuple[int, int] | None = None
    # The grids the kept values and U, V are rounded to (None: stored in the float dtype); set by the engine from
    # `OATSConfig.value_bits` / `lowrank_bits`, read by methods that round while placing values (`quantizes_jointly`).
    values: GroupSpec | None = None
    factors: GroupSpec | None = None

    def num_parameters(self, d_out: int, d_in: int) -> int:
        return counted_parameters(self.keep_per_row * d_out, self.rank, d_in, d_out)

    def layer_sparsity(self, d_in: int) -> float:
        """The kept count as one layer-wide sparsity, for the references' joint (not per-row) masks."""
        return 1.0 - self.keep_per_row / d_in


def layer_budget(
    d_out: int, d_in: int, compression_rate: float, rank_ratio: float, nm: tuple[int, int] | None = None
) -> LayerBudget:
    """Split a layer's kept parameters between the low-rank and the sparse term.

    Unstructured: `r = floor(κ (1-ρ) d_out d_in / (d_out + d_in))` as in the reference code; the sparse term
    then receives the rest of the budget `(1-ρ) d_out d_in - r (d_out + d_in)`, rounded down to a whole number
    per row, so the total never exceeds `(1-ρ) d_out d_in` and falls short by less than one row. A rate that keeps
    nothing at all (rank 0 and no weight per row: the layer would output zeros) is a `ValueError`.

    N:M: the sparse term keeps exactly `N/M` of each row and ρ is not used; the low-rank term takes the share
    κ of the total, i.e. `r = floor(κ/(1-κ) · N/M · d_out d_in / (d_out + d_in))`.
    """
    if nm is not None:
        n, m = nm
        sparse_params = d_out * d_in * n / m
        rank = math.floor(rank_ratio / (1 - rank_ratio) * sparse_params / (d_out + d_in))
        return LayerBudget(rank=min(rank, d_out, d_in), keep_per_row=d_in * n // m, nm=nm)
    total = math.floor((1 - compression_rate) * d_out * d_in + 1e-6)  # the epsilon absorbs float error only
    rank = min(math.floor(rank_ratio * total / (d_out + d_in)), d_out, d_in)
    keep_per_row = max(0, min((total - rank * (d_out + d_in)) // d_out, d_in))
    if rank == 0 and keep_per_row == 0:
        raise ValueError(
            f"`compression_rate={compression_rate}` keeps nothing of a {d_out}x{d_in} layer (rank 0 and 0 weights "
            f"per row), so it would output zeros. Use `compression_rate` <= {1 - 1 / d_in:.6g} (one weight per row "
            "of this layer)."
        )
    return LayerBudget(rank=rank, keep_per_row=keep_per_row)
