"""OATS: outlier-aware sparse + low-rank decomposition by alternating thresholding.

Zhang & Papyan, "OATS: Outlier-Aware Pruning Through Sparse and Low Rank Decomposition", ICLR 2025
(https://arxiv.org/abs/2409.13652).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .masks import sparsity_mask

OATS_PRECISION = torch.float32


@dataclass
class Decomposition:
    """`W ≈ sparse + lowrank_u @ lowrank_v`; `sparse` is dense with zeros where pruned."""

    sparse: torch.Tensor
    lowrank_u: torch.Tensor | None = None
    lowrank_v: torch.Tensor | None = None
    history: list[float] = field(default_factory=list)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation as factors `(U Σ, V^T)` by a full thin SVD (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def safe_input_norms(input_norms: torch.Tensor) -> torch.Tensor:
    """Input-column norms with dead features lifted off zero, so unscaling never divides by zero."""
    floor = input_norms.max().clamp_min(1e-12) * 1e-6
    return input_norms.clamp_min(floor)


def oats_decompose(
    weight: torch.Tensor,
    input_norms: torch.Tensor,
    *,
    rank: int,
    keep_per_row: int,
    nm: tuple[int, int] | None = None,
    iterations: int = 80,
    track_error: bool = False,
) -> Decomposition:
    """Decompose `weight` into sparse + low-rank after scaling columns by the inputs' norms.

    In the scaled space `W_s = W diag(D)` alternate, for a fixed number of iterations:
    `L = best rank-r approximation of (W_s - S)`, then `S = row-wise hard threshold of (W_s - L)`
    (top-`keep_per_row` entries of each row, or N:M). Both terms are finally unscaled by `D`.

    Args:
        weight: `(d_out, d_in)`.
        input_norms: `(d_in,)`, `D_j = ||X_j||_2` over all calibration tokens.
        rank: rank r of the low-rank term (0 gives a Wanda-scored pruning).
        keep_per_row: entries of S kept per row (ignored when `nm` is given).
        nm: `(N, M)` pattern for S.
        iterations: alternating steps (the reference code uses 80 with no early stop).
        track_error: record `||W_s - S - L||_F / ||W_s||_F` after every iteration in `history`.

    Returns:
        [`Decomposition`] with `sparse (d_out, d_in)`, `lowrank_u (d_out, r)`, `lowrank_v (r, d_in)` in
        float32.
    """
    norms = safe_input_norms(input_norms.to(device=weight.device, dtype=OATS_PRECISION))
    scaled = weight.to(OATS_PRECISION) * norms
    if rank == 0:
        sparse = scaled * sparsity_mask(scaled.abs(), keep_per_row, nm)
        return Decomposition(sparse=sparse / norms)

    sparse = torch.zeros_like(scaled)
    history: list[float] = []
    scale = scaled.norm()
    for _ in range(iterations):
        u, v = truncated_svd(scaled - sparse, rank)
        residual = scaled - u @ v
        sparse = residual * sparsity_mask(residual.abs(), keep_per_row, nm)
        if track_error:
            history.append(float((residual - sparse).norm() / scale))
    return Decomposition(sparse=sparse / norms, lowrank_u=u, lowrank_v=v / norms, history=history)
