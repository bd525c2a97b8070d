"""Sparse + low-rank in the full Hessian metric: alternate OBS pruning and an H-weighted rank-r fit.

Minimises the layer's output error `tr((W - S - L) H (W - S - L)^T)` with `H = 2 X^T X / n` (damped as SparseGPT
damps it) under the OATS budget: `S` keeps `k` entries per row on average (or N:M), `L` has rank `r`. OATS and Wanda
see only `diag(H)`; SparseGPT sees all of `H` but spends the whole budget on `S`. This is the alternating scheme of
HASSLE-free (Makni et al., CPAL 2025; `hassle_free_sparsegpt` in mazumder-lab/3BASiL), started from the OATS
solution instead of `L = 0`:

- S-step: SparseGPT (joint mask per column block, OBS updates of the kept weights) of `W - L` under `H` chooses
  the support; then conjugate-gradient steps on the kept values with the support fixed (the "backsolve" of ALPS
  and 3BASiL), which SparseGPT's one-pass OBS update only approximates: on SmolLM2 layers at ρ = 0.6–0.7 ten
  steps cut SparseGPT's output error by 13–14% for about the cost of the pass itself (`benchmarks/hessian_slr.py`);
- L-step: the exact minimiser for that `S`: with any square root `H = C C^T`, `L = SVD_r((W - S) C) C^-1` (EoRA's
  fit uses `C = Q Λ^½`; the Cholesky factor gives the same minimiser without an eigendecomposition, whose time and
  `2 d_in²` workspace it saves).

The first iterate polishes the warm start: CG on the OATS support, then the L-step, so the result is never worse than
OATS in this metric (at low ρ, where OATS's support is already good, SparseGPT's greedy support can be). The L-step
and the CG steps cannot raise the objective; SparseGPT's greedy support choice can. An S-step that leaves the
objective above the best iterate's is rejected and the iteration stops, so the history never rises.

[`shrink_hessian`] with λ gives the metric `(1 - λ) H + λ diag(H)` (the caller passes it as `hessian`): λ = 1 is
OATS's diagonal metric, where every weight's error counts independently, λ = 0 the full one. `H` is estimated from a
few thousand calibration tokens; its off-diagonal correlations are what SparseGPT's updates and the CG refit exploit,
and at low ρ, where the errors are small, fitting them exactly fits the sample more than the model
(docs/quality.md measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .oats import Decomposition
from .sparsegpt import (
    SPARSEGPT_PRECISION,
    damped_hessian,
    inverse_factor_from_cholesky,
    no_tf32,
    prune_with_factor,
)

# Alternations after the warm start; measured on SmolLM2-135M by `benchmarks/hessian_slr.py` (docs/quality.md).
DEFAULT_HESSIAN_ITERATIONS = 2
# Conjugate-gradient steps on S's kept values per S-step (0: SparseGPT's values as they come).
DEFAULT_REFIT_STEPS = 10
# `OATSConfig.hessian_shrinkage` left unset: λ by the layer's compression rate. Measured on SmolLM2-135M
# (docs/quality.md): λ = 0.5 beat the full Hessian at ρ = 0.3, 0.4 and 0.5 and lost at 0.6.
AUTO_SHRINKAGE = 0.5
AUTO_SHRINKAGE_BELOW_RATE = 0.55


@dataclass(frozen=True)
class HessianFactors:
    """What every step needs from one layer's Hessian, computed once per layer.

    `hessian` is damped with dead inputs set to 1 (as SparseGPT); `cholesky` is its lower Cholesky factor `C`
    (`H = C C^T`), the square root of the rank-r fit; `hinv` is the upper Cholesky factor of `H^-1` that SparseGPT's
    pass reads, computed from `C` by the reference's own steps.
    """

    hessian: torch.Tensor
    cholesky: torch.Tensor
    hinv: torch.Tensor
    dead: torch.Tensor


def hessian_factors(hessian: torch.Tensor, percdamp: float = 0.01) -> HessianFactors:
    """Damp `hessian` exactly as [`inverse_hessian_factor`] does and factor it."""
    if not torch.isfinite(hessian).all():
        raise ValueError(
            "The Hessian holds NaN/inf: run the calibration in float32 and check the model's activations."
        )
    damped, dead = damped_hessian(hessian, percdamp)
    cholesky, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        raise ValueError(
            f"The dampened Hessian is not positive definite (`percdamp`={percdamp}); increase `percdamp` "
            "or check the calibration statistics for NaN/inf."
        )
    return HessianFactors(damped, cholesky, inverse_factor_from_cholesky(cholesky, percdamp), dead)


def shrink_hessian(hessian: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """`(1 - λ) H + λ diag(H)`: the off-diagonal input correlations scaled by `1 - λ`, the diagonal kept."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"`shrinkage` must be in [0, 1] (0: full Hessian, 1: its diagonal), got {shrinkage}.")
    if shrinkage == 0.0:
        return hessian
    shrunk = hessian * (1.0 - shrinkage)
    shrunk.diagonal().copy_(hessian.diagonal())
    return shrunk


def default_shrinkage(compression_rate: float) -> float:
    """The λ a layer compressed at `compression_rate` gets when none is given: the full Hessian where errors are
    large (high ρ), shrinkage where they are small enough that the sample's correlations are fitted more than the
    model's."""
    return AUTO_SHRINKAGE if compression_rate < AUTO_SHRINKAGE_BELOW_RATE else 0.0


def hessian_objective(residual: torch.Tensor, hessian: torch.Tensor) -> float:
    """`tr(R H R^T)`: the summed squared output error of `R` on the calibration inputs (up to `2/n`)."""
    residual = residual.to(hessian.dtype)
    return float(((residual @ hessian) * residual).sum())


def weighted_low_rank(
    residual: torch.Tensor, factors: HessianFactors, rank: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rank-`rank` `L = U V` minimising `tr((R - L) H (R - L)^T)`, as balanced factors `(d_out, r)`, `(r, d_in)`.

    The objective is `||(R - L) C||_F²` with `H = C C^T`, and `L -> L C` is a rank-preserving bijection (`C` is
    invertible after damping), so Eckart–Young on `R C` gives the exact minimiser; `C^-1` is a triangular solve.
    """
    if rank == 0:
        return None, None
    chol = factors.cholesky
    u, s, vh = torch.linalg.svd(residual.to(chol.dtype) @ chol, full_matrices=False)
    half = s[:rank].sqrt()
    lowrank_u = u[:, :rank] * half
    lowrank_v = torch.linalg.solve_triangular(chol, half.unsqueeze(1) * vh[:rank], upper=False, left=False)
    return lowrank_u.to(residual.dtype), lowrank_v.to(residual.dtype)


def refit_on_support(target: torch.Tensor, sparse: torch.Tensor, hessian: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` conjugate-gradient steps from `sparse` on `min tr((T - S) H (T - S)^T)` over S's non-zeros.

    Rows are independent problems (the support differs per row) and run as one batch: each step is one
    `(d_out, d_in) x (d_in, d_in)` product. CG on the support-restricted (positive definite) system lowers the
    objective at every step, so it can only improve on SparseGPT's values.
    """
    support = sparse != 0
    values = sparse.clone()
    residual = (target - values) @ hessian * support  # minus the gradient, restricted to the support
    direction = residual.clone()
    norm = (residual * residual).sum(1, keepdim=True)
    for _ in range(steps):
        product = (direction @ hessian) * support
        curvature = (direction * product).sum(1, keepdim=True)
        alpha = torch.where(curvature > 0, norm / curvature.clamp_min(1e-30), torch.zeros_like(norm))
        values += alpha * direction
        residual -= alpha * product
        new_norm = (residual * residual).sum(1, keepdim=True)
        direction = (
            residual + torch.where(norm > 0, new_norm / norm.clamp_min(1e-30), torch.zeros_like(norm)) * direction
        )
        norm = new_norm
    return values * support


def hessian_sparse_low_rank(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    rank: int,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    iterations: int = DEFAULT_HESSIAN_ITERATIONS,
    warm_start: Decomposition | None = None,
    refit_steps: int = DEFAULT_REFIT_STEPS,
    percdamp: float = 0.01,
) -> Decomposition:
    """Decompose `weight ≈ S + U V` in the metric of `hessian` (see the module docstring).

    Args:
        weight: `(d_out, d_in)`; not modified.
        hessian: `(d_in, d_in)` layer Hessian `2 X^T X / n`, or its [`shrink_hessian`] (the metric minimised).
        rank: rank of `L`, in `[0, min(d_out, d_in)]`.
        sparsity: fraction of `S` pruned, jointly per 128-column block as SparseGPT does (unstructured).
        nm: `(N, M)`: `S` keeps N of every M consecutive columns of each row (instead of `sparsity`).
        iterations: S-step / L-step alternations after the polished warm start; 0 keeps the warm start's support
            (its values refitted and its low-rank term re-fitted in this metric, nothing else).
        warm_start: a first decomposition at the same budget (OATS's): its support is refitted and its low-rank
            term re-fitted in this metric as the first iterate, which the alternation must then beat. None: start
            from `L = 0`, so with `rank=0`, one iteration and `refit_steps=0` this is exactly SparseGPT.
        refit_steps: conjugate-gradient steps on the kept values of S after each SparseGPT pass.
        percdamp: diagonal damping as a fraction of `mean(diag H)` (SparseGPT's default).

    Returns:
        A `Decomposition` in float32; `history` holds the relative objective `tr(ΔHΔ^T) / tr(WHW^T)` of every
        accepted iterate (the polished warm start first, when given), so `iterations` is at most `iterations + 1`.
        Weights and low-rank columns of dead inputs (`H_jj = 0`) are zero.
    """
    d_out, d_in = weight.shape
    if not 0 <= rank <= min(d_out, d_in):
        raise ValueError(
            f"`rank` must be in [0, {min(d_out, d_in)}] for a {d_out}x{d_in} weight, got {rank}: lower "
            "`rank_ratio` or `compression_rate`."
        )
    if (sparsity is None) == (nm is None):
        raise ValueError(f"Give exactly one of `sparsity` or `nm`, got sparsity={sparsity}, nm={nm}.")
    if iterations < 0 or refit_steps < 0:
        raise ValueError(f"Need `iterations` >= 0 and `refit_steps` >= 0, got {iterations} and {refit_steps}.")
    if iterations == 0 and (warm_start is None or rank == 0):
        raise ValueError(
            "`iterations=0` polishes the warm start only: it needs a `warm_start` and `rank` > 0 (give "
            "`iterations` >= 1 otherwise)."
        )
    with no_tf32():
        return _alternate(weight, hessian, rank, (sparsity, nm), iterations, warm_start, refit_steps, percdamp)


def _alternate(weight, hessian, rank, pattern, iterations, warm_start, refit_steps, percdamp) -> Decomposition:
    sparsity, nm = pattern
    target = weight.detach().to(SPARSEGPT_PRECISION, copy=True)
    factors = hessian_factors(hessian.to(target.device), percdamp)
    target[:, factors.dead] = 0
    scale = max(hessian_objective(target, factors.hessian), 1e-30)
    best: Decomposition | None = None

    def accept(sparse: torch.Tensor, lowrank_u: torch.Tensor | None, lowrank_v: torch.Tensor | None) -> bool:
        nonlocal best
        approx = sparse if lowrank_u is None else sparse + lowrank_u @ lowrank_v
        loss = hessian_objective(target - approx, factors.hessian) / scale
        if best is not None and loss > best.history[-1]:
            return False  # a greedy S-step made it worse: keep the previous iterate
        history = [*best.history, loss] if best is not None else [loss]
        best = Decomposition(sparse, lowrank_u, lowrank_v, history=history, iterations=len(history))
        return True

    lowrank_u = lowrank_v = None
    if warm_start is not None and rank > 0:
        start = warm_start.sparse.to(target, copy=True)
        start[:, factors.dead] = 0
        lowrank = warm_start.lowrank_u.to(target) @ warm_start.lowrank_v.to(target)
        sparse = refit_on_support(target - lowrank, start, factors.hessian, refit_steps)
        lowrank_u, lowrank_v = weighted_low_rank(target - sparse, factors, rank)
        accept(sparse, lowrank_u, lowrank_v)
    for _ in range(iterations):
        lowrank = lowrank_u @ lowrank_v if lowrank_u is not None else 0
        sparse = prune_with_factor(target - lowrank, factors.hinv, factors.dead, sparsity=sparsity, nm=nm)
        sparse = refit_on_support(target - lowrank, sparse, factors.hessian, refit_steps)
        lowrank_u, lowrank_v = weighted_low_rank(target - sparse, factors, rank)
        if not accept(sparse, lowrank_u, lowrank_v):
            break
    if best.lowrank_v is not None:
        best.lowrank_v[:, factors.dead] = 0  # no response to features calibration never saw, as S
    return best
