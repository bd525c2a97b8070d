"""One-shot pruning baselines: magnitude and Wanda.

Wanda: Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024
(https://arxiv.org/abs/2306.11695).
"""

from __future__ import annotations

import torch

from .budget import LayerBudget
from .masks import sparsity_mask
from .method import INPUT_NORMS, Algorithm, NoSettings
from .oats import Decomposition


def magnitude_prune(
    weight: torch.Tensor,
    *,
    sparsity: float | None = None,
    keep_per_row: int | None = None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Magnitude pruning; returns the pruned `(d_out, d_in)` weight.

    `sparsity=s` is the references' rule (wanda `prune_magnitude`, SparseGPT's magnitude baseline): one threshold
    for the whole layer, every `|W_ij| <=` the sorted value at index `int(s · numel)` pruned. `keep_per_row=k`
    (row-balanced, an explicit option) keeps the `k` largest of each row; `nm` keeps N of every M per row.
    """
    if nm is not None or sparsity is None:
        if keep_per_row is None:
            raise ValueError("Give `sparsity` (one threshold per layer), `keep_per_row`, or `nm`.")
        return weight * sparsity_mask(weight.abs(), keep_per_row, nm)
    if not 0 <= sparsity < 1:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}.")
    scores = weight.abs()
    threshold = torch.sort(scores.flatten())[0][int(weight.numel() * sparsity)]
    return weight.masked_fill(scores <= threshold, 0)


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


def run_wanda(
    weight: torch.Tensor, stats: dict[str, torch.Tensor], budget: LayerBudget, settings: NoSettings
) -> Decomposition:
    return Decomposition(
        wanda_prune(weight.float(), stats[INPUT_NORMS], keep_per_row=budget.keep_per_row, nm=budget.nm)
    )


def run_magnitude(
    weight: torch.Tensor, stats: dict[str, torch.Tensor], budget: LayerBudget, settings: NoSettings
) -> Decomposition:
    """One threshold per layer (wanda `prune_magnitude`); N:M per row."""
    if budget.nm is not None:
        return Decomposition(magnitude_prune(weight.float(), keep_per_row=budget.keep_per_row, nm=budget.nm))
    return Decomposition(magnitude_prune(weight.float(), sparsity=budget.layer_sparsity(weight.shape[1])))


WANDA = Algorithm("wanda", "Wanda pruning", (INPUT_NORMS,), uses_low_rank=False, run=run_wanda, rows_balanced=True)
MAGNITUDE = Algorithm("magnitude", "magnitude pruning", (), uses_low_rank=False, run=run_magnitude)
