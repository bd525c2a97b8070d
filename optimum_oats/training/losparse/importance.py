"""LoSparse's importance scores and its global row selection: pure tensor functions.

Sensitivity of a weight is `|S ⊙ ∇S|` (a first-order estimate of the loss change if it were zeroed). LoSparse
(following PLATON) averages it over windows of `ΔT` optimizer steps and smooths the window averages with an
exponential moving average (β1 = 0.85). PLATON's uncertainty term is off in LoSparse's default configuration and
is not implemented. A row's score is the mean over the row.

Because the row mean is linear, keeping the window and the EMA per *row* (as done here) gives exactly the row
means of the per-weight quantities, at `1 / in_features` of the memory (and small enough to be saved in a
`Trainer` checkpoint's `trainer_state.json`).
"""

from __future__ import annotations

import torch


def row_sensitivity(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`mean_j |S_ij ∇S_ij|` for each row i: `(out, in), (out, in) -> (out,)` in float32."""
    return (weight.detach().float() * grad.detach().float()).abs().mean(dim=1)


def update_scores(
    window: torch.Tensor, ema: torch.Tensor, value: torch.Tensor, step: int, delta_t: int, beta1: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of the windowed, smoothed sensitivity; returns `(window, ema)`.

    Steps `kΔT + 1 ... (k+1)ΔT` (1-based) form window k; its running mean is `window`. At the first step of the
    next window the finished mean enters the EMA, `ema ← β1 ema + (1 - β1) window`, and a new window starts.
    """
    local = (step - 1) % delta_t
    if local == 0:
        ema = beta1 * ema + (1.0 - beta1) * window
        return value.clone(), ema
    return (window * local + value) / (local + 1), ema


def select_rows(
    scores: list[torch.Tensor], row_sizes: list[int], alive: list[torch.Tensor], ratio: float
) -> tuple[list[torch.Tensor], float]:
    """Keep the highest-scoring rows of all layers together until `ratio` of all rows' parameters is reached.

    One global threshold across layers: rows are ranked by score (pruned rows last, never revived) and kept
    while the running parameter count stays within `ratio × total`. Weighting by row length makes the kept
    fraction of *parameters* hit the target (within one row) even though layers have rows of different length.

    Args:
        scores: per layer, `(out,)` row scores.
        row_sizes: per layer, the row length (`in_features`).
        alive: per layer, `(out,)` bool, rows not yet pruned.
        ratio: the remaining ratio of S parameters, in [0, 1].

    Returns:
        The new per-layer `(out,)` keep masks and the threshold (the lowest kept score; `inf` if none kept).
    """
    flat_scores = torch.cat([torch.where(a, s.float(), float("-inf")) for s, a in zip(scores, alive, strict=True)])
    sizes = torch.cat(
        [torch.full((s.numel(),), n, dtype=torch.float64) for s, n in zip(scores, row_sizes, strict=True)]
    )
    flat_alive = torch.cat(alive)
    order = torch.argsort(flat_scores, descending=True, stable=True)
    within = torch.cumsum(sizes[order], 0) <= ratio * float(sizes.sum()) + 1e-6
    count = int(within.sum())
    keep = torch.zeros_like(flat_alive)
    keep[order[:count]] = True
    keep &= flat_alive
    threshold = float(flat_scores[order[count - 1]]) if count else float("inf")
    return list(keep.split([s.numel() for s in scores])), threshold
