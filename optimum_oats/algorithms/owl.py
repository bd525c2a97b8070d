"""OWL: outlier-weighted layerwise sparsity, a non-uniform sparsity rate per decoder block.

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to High
Sparsity", ICML 2024 (https://arxiv.org/abs/2310.05175); reference code `prune_wanda_outlier` and
`check_outlier_mean` in luuyin/OWL.

Blocks whose Wanda scores hold more outliers are pruned less; the mean rate over blocks stays the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def outlier_ratios(block_scores: Sequence[torch.Tensor], threshold_m: float) -> torch.Tensor:
    """Outlier ratio `D_l` of one block: percentage of its Wanda scores above `M ×` their mean.

    The scores of all linear layers of the block are pooled as if concatenated (as the reference does), but
    without materialising the concatenation; the mean is accumulated in float64 and compared in float32.

    Args:
        block_scores: Wanda scores `|W_ij| · ||X_j||_2` of every linear layer of the block, any shapes.
        threshold_m: the outlier threshold `M` (reference defaults: 3 in argparse, 5 for LLaMA-7B at 70%).

    Returns:
        0-dim float64 tensor, `D_l` in percent (`[0, 100]`).
    """
    if not block_scores:
        raise ValueError("`block_scores` is empty: give the Wanda scores of every linear layer of the block.")
    if threshold_m <= 0:
        raise ValueError(f"`threshold_m` must be > 0, got {threshold_m}.")
    total = sum(scores.numel() for scores in block_scores)
    if total == 0:
        raise ValueError("`block_scores` hold no entries.")
    mean = sum(float(scores.sum(dtype=torch.float64)) for scores in block_scores) / total
    threshold = mean * threshold_m
    count = sum(int((scores.float() > threshold).sum()) for scores in block_scores)
    return torch.tensor(100.0 * count / total, dtype=torch.float64)


def owl_block_rates(outlier_ratios: torch.Tensor | Sequence[float], target_rate: float, lam: float) -> list[float]:
    """Per-block sparsity rates from the blocks' outlier ratios (OWL steps 3–4).

    `D'_l = 2λ (D_l - min D) / (max D - min D)`, density `d_l = D'_l - mean(D') + (1 - S)`, rate `s_l = 1 - d_l`.
    Rates therefore average exactly to `S`, span exactly `2λ`, and fall as the outlier ratio rises. When all
    ratios are equal the rates are uniform (`S` everywhere).

    Args:
        outlier_ratios: `(num_blocks,)` outlier ratios `D_l` (see [`outlier_ratios`]).
        target_rate: the target mean sparsity `S`, in `(0, 1)`.
        lam: `λ`, half the spread of the rates (reference default 0.08), `>= 0`.

    Returns:
        One sparsity rate per block, each in `(0, 1)`.
    """
    D = torch.as_tensor(outlier_ratios, dtype=torch.float64).cpu()
    if D.dim() != 1 or D.numel() == 0:
        raise ValueError(f"`outlier_ratios` must be a non-empty 1-D tensor, got shape {tuple(D.shape)}.")
    if not torch.isfinite(D).all():
        raise ValueError(f"`outlier_ratios` must be finite, got {D.tolist()}.")
    if not 0 < target_rate < 1:
        raise ValueError(f"`target_rate` must be in (0, 1), got {target_rate}.")
    if lam < 0:
        raise ValueError(f"`lam` must be >= 0, got {lam}.")
    spread = D.max() - D.min()
    if spread > 0:
        D_scaled = 2 * lam * (D - D.min()) / spread
    else:
        D_scaled = torch.zeros_like(D)
    density = D_scaled - D_scaled.mean() + (1 - target_rate)
    rates = 1 - density
    if not ((rates > 0) & (rates < 1)).all():
        raise ValueError(
            f"OWL rates {[round(r, 4) for r in rates.tolist()]} leave (0, 1) with `lam`={lam} and "
            f"`target_rate`={target_rate}; lower `lam` or move `target_rate` away from 0 and 1."
        )
    return rates.tolist()
