"""Sparsity masks from importance scores: per-row top-k (unstructured) and N:M."""

from __future__ import annotations

import torch


def rowwise_topk_mask(scores: torch.Tensor, keep_per_row: int) -> torch.Tensor:
    """Keep the `keep_per_row` highest scores of every row, as Wanda compares weights within an output row.

    Args:
        scores: `(d_out, d_in)` importance scores.
        keep_per_row: entries kept in each row, in `[0, d_in]`.

    Returns:
        bool `(d_out, d_in)` mask with exactly `keep_per_row` True entries per row.
    """
    if not 0 <= keep_per_row <= scores.shape[1]:
        raise ValueError(f"`keep_per_row` must be in [0, {scores.shape[1]}], got {keep_per_row}.")
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep_per_row:
        mask.scatter_(1, scores.topk(keep_per_row, dim=1, sorted=False).indices, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores in each group of `m` consecutive input columns of every row.

    Args:
        scores: `(d_out, d_in)` with `d_in` divisible by `m`.

    Returns:
        bool `(d_out, d_in)` mask with exactly `n` True entries per group.
    """
    d_out, d_in = scores.shape
    check_nm_width(d_in, m)
    groups = scores.reshape(d_out, d_in // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.topk(n, dim=2, sorted=False).indices, True)
    return mask.reshape(d_out, d_in)


def check_nm_width(in_features: int, m: int) -> None:
    if in_features % m:
        raise ValueError(f"N:M sparsity needs `in_features` divisible by M={m}, got {in_features}.")


def sparsity_mask(scores: torch.Tensor, keep_per_row: int, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Dispatch to [`nm_mask`] when an N:M pattern is given, else [`rowwise_topk_mask`]."""
    return nm_mask(scores, *nm) if nm is not None else rowwise_topk_mask(scores, keep_per_row)
