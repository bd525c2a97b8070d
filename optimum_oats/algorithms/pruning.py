"""One-shot pruning baselines: magnitude and Wanda.

Wanda: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024
(https://arxiv.org/abs/2306.11695).
"""

from __future__ import annotations

import torch

from .masks import sparsity_mask


def magnitude_prune(weight: torch.Tensor, *, keep_per_row: int, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep the largest `|W_ij|` of each row (or N:M group); returns the pruned `(d_out, d_in)` weight."""
    return weight * sparsity_mask(weight.abs(), keep_per_row, nm)


def wanda_prune(
    weight: torch.Tensor, input_norms: torch.Tensor, *, keep_per_row: int, nm: tuple[int, int] | None = None
) -> torch.Tensor:
    """Keep the highest Wanda scores `|W_ij| · ||X_j||_2` of each row (or N:M group); no weight update.

    Args:
        weight: `(d_out, d_in)`.
        input_norms: `(d_in,)` input feature norms over all calibration tokens.
    """
    scores = weight.abs().float() * input_norms.to(weight.device, torch.float32)
    return weight * sparsity_mask(scores, keep_per_row, nm)
