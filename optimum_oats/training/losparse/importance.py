"""LoSparse's importance scores and its global row selection: pure tensor functions.

Follows the reference `Pruner` (yxli2123/LoSparse `utils.py`, PLATON's scores) step for step. Sensitivity of a
weight is `|S ⊙ ∇S|`. Windows of `ΔT` optimizer steps are averaged (`ipt`); at the first step of each window (0-based
`step % ΔT == 0`) the finished window enters an exponential moving average, `ema ← β1 ema + (1 - β1) ipt`, and — if
PLATON's uncertainty term is on (`0 < β2 < 1`) — `unc ← β2 unc + (1 - β2) |ipt - ema|`; then the new window starts
with this step's value. The score is `ema` (β2 = 1, LoSparse's default) or `ema ⊙ unc`, averaged over each row.

With β2 = 1 the state is kept per *row*: the row mean is linear, so tracking row means gives exactly the row means
of the per-weight quantities at `1 / in_features` of the memory. The uncertainty term is not linear (`|.|` and a
product), so with `0 < β2 < 1` the state is per weight, as in the reference (three tensors of the size of S).
"""

from __future__ import annotations

import torch

ScoreState = dict[str, torch.Tensor]


def sensitivity(weight: torch.Tensor, grad: torch.Tensor, *, per_row: bool) -> torch.Tensor:
    """`|S ⊙ ∇S|` in float32: `(out, in)`, or its row means `(out,)` when `per_row`."""
    value = (weight.detach().float() * grad.detach().float()).abs()
    return value.mean(dim=1) if per_row else value


def uses_uncertainty(beta2: float) -> bool:
    return 0.0 < beta2 < 1.0


def new_state(value: torch.Tensor, beta2: float) -> ScoreState:
    state = {"window": torch.zeros_like(value), "ema": torch.zeros_like(value)}
    if uses_uncertainty(beta2):
        state["unc"] = torch.zeros_like(value)
    return state


def update_scores(state: ScoreState, value: torch.Tensor, step: int, delta_t: int, beta1: float, beta2: float) -> None:
    """Take in this optimizer step's sensitivity `value` (in place); `step` is 0-based (the steps completed before).

    The reference's `update_ipt_with_local_window`: at `step % ΔT == 0` the finished window enters the EMA (and the
    uncertainty), then a new window starts with `value`; otherwise `value` joins the running window mean.
    """
    local = step % delta_t
    if local == 0:
        state["ema"] = beta1 * state["ema"] + (1 - beta1) * state["window"]
        if uses_uncertainty(beta2):
            state["unc"] = beta2 * state["unc"] + (1 - beta2) * (state["window"] - state["ema"]).abs()
        state["window"] = value.clone()
    else:
        state["window"] = (state["window"] * local + value) / (local + 1)


def row_scores(state: ScoreState) -> torch.Tensor:
    """The importance of each row: the row mean of `ema` (or of `ema ⊙ unc` with the uncertainty term)."""
    score = state["ema"] * state["unc"] if "unc" in state else state["ema"]
    return score.mean(dim=1) if score.dim() == 2 else score


def select_rows(scores: list[torch.Tensor], row_sizes: list[int], ratio: float) -> tuple[list[torch.Tensor], float]:
    """One global threshold over all layers' rows, as the reference's `mask_with_threshold` draws it.

    The reference repeats each row's score over its `in_features` weights, takes the `k`-th smallest of all the
    weights' scores with `k = int(N (1 - ratio))` (`N` weights in all) as the threshold, and prunes every weight
    scoring strictly below it. Done here on rows with their lengths as weights; the result is the same. At least
    `ratio` of the parameters are kept (rows tied with the threshold all stay). Every row is re-decided, so a row
    pruned before comes back if its score has risen above the threshold.

    Args:
        scores: per layer, `(out,)` row scores.
        row_sizes: per layer, the row length (`in_features`).
        ratio: the remaining ratio of S parameters, in [0, 1].

    Returns:
        The per-layer `(out,)` keep masks and the threshold (`-inf` when nothing is pruned).
    """
    flat = torch.cat([s.float() for s in scores])
    sizes = torch.cat([torch.full((s.numel(),), n, dtype=torch.int64) for s, n in zip(scores, row_sizes, strict=True)])
    k = int(int(sizes.sum()) * (1 - ratio))
    if k <= 0:
        return [torch.ones(s.numel(), dtype=torch.bool) for s in scores], float("-inf")
    order = torch.argsort(flat, stable=True)
    position = int(torch.searchsorted(torch.cumsum(sizes[order], 0), torch.tensor(k)))  # first cumsum >= k
    threshold = float(flat[order[position]])
    keep = flat >= threshold
    return list(keep.split([s.numel() for s in scores])), threshold
