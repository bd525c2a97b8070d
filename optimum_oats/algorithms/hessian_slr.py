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

Shrinkage λ (`hessian_metric(H, shrinkage=λ)`, or [`shrink_hessian`] applied by the caller) gives the metric
`(1 - λ) H + λ diag(H)`: λ = 1 is
OATS's diagonal metric, where every weight's error counts independently, λ = 0 the full one. `H` is estimated from a
few thousand calibration tokens; its off-diagonal correlations are what SparseGPT's updates and the CG refit exploit,
and at low ρ, where the errors are small, fitting them exactly fits the sample more than the model
(docs/quality.md measures it).

Quantized ([`quantized_hessian_sparse_low_rank`]): each S-step and L-step ends by rounding, with compensation, as
`quantize_hessian.py` describes; the objective, and so the acceptance of an iterate, is the rounded decomposition's.

Each phase runs under a `torch.profiler.record_function` label (`hassle/s_step`, `hassle/refit`, `hassle/l_step`,
`hassle/objective`) so that a profile on any device shows where the time goes (`benchmarks/hessian_slr.py --profile`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.profiler import record_function

from ..utils.settings import check_float, check_int, setting
from .budget import LayerBudget
from .method import HESSIAN, INPUT_NORMS, Algorithm
from .oats import Decomposition, OATSSettings, run_oats
from .quantize import GroupSpec
from .quantize_hessian import quantize_factors, quantize_on_support
from .sparsegpt import (
    SPARSEGPT_PRECISION,
    _not_positive_definite,
    damped_hessian,
    no_tf32,
    prune_with_factor,
)

# Alternations after the warm start; measured on SmolLM2-135M by `benchmarks/hessian_slr.py` (docs/quality.md).
DEFAULT_HESSIAN_ITERATIONS = 2
# Conjugate-gradient steps on S's kept values per S-step (0: SparseGPT's values as they come).
DEFAULT_REFIT_STEPS = 10
# `HassleSettings.hessian_shrinkage` left unset: λ by the layer's compression rate. Measured on SmolLM2-135M
# (docs/quality.md): λ = 0.5 beat the full Hessian at ρ = 0.3, 0.4 and 0.5 and lost at 0.6.
AUTO_SHRINKAGE = 0.5
AUTO_SHRINKAGE_BELOW_RATE = 0.55


# Rows of S refitted (and of the objective summed) per batch: bounds the conjugate-gradient workspace to a few
# `(ROW_CHUNK, d_in)` matrices instead of five full `(d_out, d_in)` ones; rows are independent problems.
ROW_CHUNK = 128


@dataclass(frozen=True)
class HessianMetric:
    """One layer's metric: the caller's Hessian (never copied for long), its damping, shrinkage and dead inputs.

    The damped, shrunk matrix and its factors are built when a step needs them and freed when it returns, so a layer
    holds at most two `d_in²` matrices besides the caller's statistics at any moment, fewer than SparseGPT's own
    inverse (three); keeping them all for the whole layer cost hassle tens of MB above SparseGPT (docs/quality.md).
    Each rebuild is one copy or one Cholesky factorisation, small next to the SVD and the OBS pass of a step.
    """

    raw: torch.Tensor
    dead: torch.Tensor
    percdamp: float
    shrinkage: float

    def hessian(self) -> torch.Tensor:
        """The metric minimised: damped as SparseGPT damps it (dead inputs set to 1), then `shrink_hessian`'s
        `(1 - λ) H + λ diag(H)` (the same matrix as shrinking first: the diagonal the damping reads is unchanged)."""
        damped, _ = damped_hessian(self.raw, self.percdamp)
        return _shrink_(damped, self.shrinkage)

    def cholesky(self) -> torch.Tensor:
        """The lower Cholesky factor `C` of the metric (`H = C C^T`), the square root of the rank-r fit."""
        factor, info = torch.linalg.cholesky_ex(self.hessian())
        if info.item() != 0:
            raise _not_positive_definite(self.percdamp)
        return factor

    def inverse_factor(self) -> torch.Tensor:
        """The upper Cholesky factor of `H^-1` that SparseGPT's pass reads, by the reference's own steps.

        Not `inverse_factor_from_cholesky(self.cholesky())`: that holds `C` as its argument beside the inverse and
        its factor (three `d_in²` matrices); here `C` is freed once the inverse exists (two)."""
        inverse = torch.cholesky_inverse(self.cholesky())
        factor, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if info.item() != 0:
            raise _not_positive_definite(self.percdamp)
        return factor


def hessian_metric(hessian: torch.Tensor, percdamp: float = 0.01, shrinkage: float = 0.0) -> HessianMetric:
    """Check `hessian` (finite) and `shrinkage` and wrap them; a Hessian that is not positive definite once damped
    is named by the first step that factors it.

    `hessian` is not copied or modified; the caller must not change it while the metric is in use.
    """
    if not torch.isfinite(hessian).all():
        raise ValueError(
            "The Hessian holds NaN/inf: run the calibration in float32 and check the model's activations."
        )
    _check_shrinkage(shrinkage)
    return HessianMetric(hessian, torch.diagonal(hessian) == 0, percdamp, shrinkage)


def shrink_hessian(hessian: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """`(1 - λ) H + λ diag(H)`: the off-diagonal input correlations scaled by `1 - λ`, the diagonal kept."""
    _check_shrinkage(shrinkage)
    if shrinkage == 0.0:
        return hessian
    return _shrink_(hessian.clone(), shrinkage)


def _check_shrinkage(shrinkage: float) -> None:
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"`shrinkage` must be in [0, 1] (0: full Hessian, 1: its diagonal), got {shrinkage}.")


def _shrink_(matrix: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """[`shrink_hessian`] in place."""
    if shrinkage:
        diagonal = matrix.diagonal().clone()
        matrix.mul_(1.0 - shrinkage).diagonal().copy_(diagonal)
    return matrix


def default_shrinkage(compression_rate: float) -> float:
    """The λ a layer compressed at `compression_rate` gets when none is given: the full Hessian where errors are
    large (high ρ), shrinkage where they are small enough that the sample's correlations are fitted more than the
    model's."""
    return AUTO_SHRINKAGE if compression_rate < AUTO_SHRINKAGE_BELOW_RATE else 0.0


def hessian_objective(residual: torch.Tensor, hessian: torch.Tensor) -> float:
    """`tr(R H R^T)`: the summed squared output error of `R` on the calibration inputs (up to `2/n`).

    The chunks' sums are added in float64 and read back once: one device synchronisation per objective, not one per
    `ROW_CHUNK` rows."""
    chunks = []
    for rows in residual.split(ROW_CHUNK):
        rows = rows.to(hessian.dtype)
        chunks.append(((rows @ hessian) * rows).sum())
    return float(torch.stack(chunks).double().sum())


def weighted_low_rank(
    residual: torch.Tensor, metric: HessianMetric, rank: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rank-`rank` `L = U V` minimising `tr((R - L) H (R - L)^T)`, as balanced factors `(d_out, r)`, `(r, d_in)`.

    The objective is `||(R - L) C||_F²` with `H = C C^T`, and `L -> L C` is a rank-preserving bijection (`C` is
    invertible after damping), so Eckart–Young on `R C` gives the exact minimiser; `C^-1` is a triangular solve.
    """
    if rank == 0:
        return None, None
    weighted = residual.to(SPARSEGPT_PRECISION) @ metric.cholesky()
    # The SVD's workspace is the L-step's peak: `C` is factored again for the solve instead of held beside it.
    u, s, vh = torch.linalg.svd(weighted, full_matrices=False)
    del weighted
    half = s[:rank].sqrt()
    lowrank_u = u[:, :rank] * half
    top = half.unsqueeze(1) * vh[:rank]
    del u, vh
    lowrank_v = torch.linalg.solve_triangular(metric.cholesky(), top, upper=False, left=False)
    return lowrank_u.to(residual.dtype), lowrank_v.to(residual.dtype)


def refit_on_support(target: torch.Tensor, sparse: torch.Tensor, hessian: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` conjugate-gradient steps from `sparse` on `min tr((T - S) H (T - S)^T)` over S's non-zeros.

    Rows are independent problems (the support differs per row) and run as batches of `ROW_CHUNK` rows: each step
    is one `(rows, d_in) x (d_in, d_in)` product. CG on the support-restricted (positive definite) system lowers
    the objective at every step, so it can only improve on SparseGPT's values.
    """
    refit = torch.empty_like(sparse)
    for start in range(0, sparse.shape[0], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        refit[rows] = _refit_rows(target[rows], sparse[rows], hessian, steps)
    return refit


def _refit_rows(target: torch.Tensor, sparse: torch.Tensor, hessian: torch.Tensor, steps: int) -> torch.Tensor:
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
    hessian: torch.Tensor | HessianMetric,
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
        hessian: `(d_in, d_in)` layer Hessian `2 X^T X / n` (or its [`shrink_hessian`]), damped by `percdamp`;
            or a [`hessian_metric`] of it (its own damping and shrinkage; `percdamp` is then ignored), which keeps
            no copy of the matrix between steps.
        rank: rank of `L`, in `[0, min(d_out, d_in)]`.
        sparsity: fraction of `S` pruned, jointly per 128-column block as SparseGPT does (unstructured).
        nm: `(N, M)`: `S` keeps N of every M consecutive columns of each row (instead of `sparsity`).
        iterations: S-step / L-step alternations after the polished warm start; 0 keeps the warm start's support
            (its values refitted and its low-rank term re-fitted in this metric, nothing else).
        warm_start: a first decomposition at the same budget (OATS's): its support is refitted and its low-rank
            term re-fitted in this metric as the first iterate, which the alternation must then beat. None: start
            from `L = 0`, so with `rank=0`, one iteration and `refit_steps=0` this is exactly SparseGPT.
        refit_steps: conjugate-gradient steps on the kept values of S after each SparseGPT pass.
        percdamp: diagonal damping as a fraction of `mean(diag H)` (SparseGPT's default) of a tensor `hessian`.

    Returns:
        A `Decomposition` in float32; `history` holds the relative objective `tr(ΔHΔ^T) / tr(WHW^T)` of every
        accepted iterate (the polished warm start first, when given), so `iterations` is at most `iterations + 1`.
        Weights and low-rank columns of dead inputs (`H_jj = 0`) are zero.
    """
    return quantized_hessian_sparse_low_rank(
        weight,
        hessian,
        None,
        None,
        rank=rank,
        sparsity=sparsity,
        nm=nm,
        iterations=iterations,
        warm_start=warm_start,
        refit_steps=refit_steps,
        percdamp=percdamp,
    )


def quantized_hessian_sparse_low_rank(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianMetric,
    value_quant: GroupSpec | None,
    lowrank_quant: GroupSpec | None,
    *,
    rank: int,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    iterations: int = DEFAULT_HESSIAN_ITERATIONS,
    warm_start: Decomposition | None = None,
    refit_steps: int = DEFAULT_REFIT_STEPS,
    percdamp: float = 0.01,
) -> Decomposition:
    """[`hessian_sparse_low_rank`] with S's kept values rounded on `value_quant`'s grid inside each S-step
    (unstructured `sparsity` only) and U, V on `lowrank_quant`'s (a `zero_level` grid) inside each L-step, as the
    module docstring describes; None leaves that part in float32. The scales are in the result's
    `value_scales`, `lowrank_u_scales`, `lowrank_v_scales`."""
    d_out, d_in = weight.shape
    if not 0 <= rank <= min(d_out, d_in):
        raise ValueError(
            f"`rank` must be in [0, {min(d_out, d_in)}] for a {d_out}x{d_in} weight, got {rank}: lower "
            "`rank_ratio` or `compression_rate`."
        )
    if (sparsity is None) == (nm is None):
        raise ValueError(f"Give exactly one of `sparsity` or `nm`, got sparsity={sparsity}, nm={nm}.")
    if value_quant is not None and nm is not None:
        raise NotImplementedError("Quantized values (`value_quant`) with `nm` are not supported yet.")
    if iterations < 0 or refit_steps < 0:
        raise ValueError(f"Need `iterations` >= 0 and `refit_steps` >= 0, got {iterations} and {refit_steps}.")
    if iterations == 0 and (warm_start is None or rank == 0):
        raise ValueError(
            "`iterations=0` polishes the warm start only: it needs a `warm_start` and `rank` > 0 (give "
            "`iterations` >= 1 otherwise)."
        )
    with no_tf32():
        return _alternate(
            weight,
            hessian,
            rank,
            (sparsity, nm),
            iterations,
            warm_start,
            refit_steps,
            percdamp,
            value_quant,
            lowrank_quant,
        )


def _alternate(
    weight, hessian, rank, pattern, iterations, warm_start, refit_steps, percdamp, value_quant, lowrank_quant
) -> Decomposition:
    sparsity, nm = pattern
    if not isinstance(hessian, HessianMetric):
        hessian = hessian_metric(hessian.to(weight.device), percdamp)
    elif hessian.raw.device != weight.device:
        hessian = replace(hessian, raw=hessian.raw.to(weight.device), dead=hessian.dead.to(weight.device))
    metric = hessian
    target = weight.detach().to(SPARSEGPT_PRECISION)  # read only: no copy unless dead inputs are zeroed
    if metric.dead.any():
        target = target.clone()
        target[:, metric.dead] = 0
    scale = max(hessian_objective(target, metric.hessian()), 1e-30)
    best: Decomposition | None = None

    def accept(sparse: torch.Tensor, lowrank_u: torch.Tensor | None, lowrank_v: torch.Tensor | None, scales) -> bool:
        nonlocal best
        residual = target - sparse
        if lowrank_u is not None:
            residual.addmm_(lowrank_u, lowrank_v, alpha=-1)
        loss = hessian_objective(residual, metric.hessian()) / scale
        del residual
        if best is not None and loss > best.history[-1]:
            return False  # a greedy S-step made it worse: keep the previous iterate
        history = [*best.history, loss] if best is not None else [loss]
        best = Decomposition(sparse, lowrank_u, lowrank_v, history=history, iterations=len(history))
        best.value_scales, best.lowrank_u_scales, best.lowrank_v_scales = scales
        return True

    def rounded_s(sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if value_quant is None:
            return sparse, None
        with record_function("hassle/quantize"):
            return quantize_on_support(sparse, metric, value_quant)

    def l_step(sparse: torch.Tensor):
        """U, V for the (rounded) S, rounded themselves when asked, and their scales."""
        with record_function("hassle/l_step"):
            lowrank_u, lowrank_v = weighted_low_rank(target - sparse, metric, rank)
        if lowrank_quant is None or lowrank_u is None:
            return lowrank_u, lowrank_v, None, None
        with record_function("hassle/quantize"):
            return quantize_factors(target - sparse, lowrank_u, lowrank_v, metric, lowrank_quant)

    def minus_low_rank(lowrank_u: torch.Tensor | None, lowrank_v: torch.Tensor | None) -> torch.Tensor:
        return target if lowrank_u is None else torch.addmm(target, lowrank_u, lowrank_v, alpha=-1)

    lowrank_u = lowrank_v = None
    if warm_start is not None and rank > 0:
        start = warm_start.sparse.to(target)  # read only, as `target`
        if metric.dead.any():
            start = start.clone()
            start[:, metric.dead] = 0
        goal = minus_low_rank(warm_start.lowrank_u.to(target), warm_start.lowrank_v.to(target))
        with record_function("hassle/refit"):
            sparse = refit_on_support(goal, start, metric.hessian(), refit_steps)
        del goal, start
        sparse, value_scales = rounded_s(sparse)
        lowrank_u, lowrank_v, u_scales, v_scales = l_step(sparse)
        with record_function("hassle/objective"):
            accept(sparse, lowrank_u, lowrank_v, (value_scales, u_scales, v_scales))
    for _ in range(iterations):
        with record_function("hassle/s_step"):
            inverse_factor = metric.inverse_factor()  # its two-matrix transient before `goal` exists
            goal = minus_low_rank(lowrank_u, lowrank_v)
            sparse = prune_with_factor(goal, inverse_factor, metric.dead, sparsity=sparsity, nm=nm)
            del inverse_factor
        with record_function("hassle/refit"):
            sparse = refit_on_support(goal, sparse, metric.hessian(), refit_steps)
        del goal
        sparse, value_scales = rounded_s(sparse)
        lowrank_u, lowrank_v, u_scales, v_scales = l_step(sparse)
        with record_function("hassle/objective"):
            accepted = accept(sparse, lowrank_u, lowrank_v, (value_scales, u_scales, v_scales))
        if not accepted:
            break
    if best.lowrank_v is not None:
        best.lowrank_v[:, metric.dead] = 0  # no response to features calibration never saw, as S
    return best


@dataclass
class HassleSettings(OATSSettings):
    """hassle's settings: OATS's (for the warm start) and the Hessian alternation's.

    Args:
        hessian_iterations (`int`, defaults to 2): SparseGPT / weighted-SVD alternations after the OATS start (each
            costs about one SparseGPT pass over the layer). 0 keeps OATS's support and only refits its values and
            low-rank term in the Hessian metric.
        hessian_shrinkage (`float`, *optional*): λ in [0, 1], the metric is `(1 - λ) H + λ diag(H)`. 0 is the full
            Hessian; 1 is OATS's own diagonal metric. A step between trusts the calibration sample's input
            correlations less (shrinkage towards the diagonal, as in covariance estimation). Unset: by the layer's
            compression rate ([`default_shrinkage`]; docs/quality.md has the measurements behind it).
    """

    hessian_iterations: int = setting(DEFAULT_HESSIAN_ITERATIONS, "SparseGPT / weighted-SVD alternations", "N")
    hessian_shrinkage: float | None = setting(
        None,
        "How far hassle's error metric leans from the full Hessian (0) to OATS's diagonal (1); unset: "
        f"{AUTO_SHRINKAGE} for layers compressed below {AUTO_SHRINKAGE_BELOW_RATE}, 0 above",
        "LAMBDA",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.hessian_iterations = check_int("hessian_iterations", self.hessian_iterations, 0)
        if self.hessian_shrinkage is not None:
            self.hessian_shrinkage = check_float(
                "hessian_shrinkage", self.hessian_shrinkage, 0.0, 1.0, low_inclusive=True, high_inclusive=True
            )


def run_hassle(
    weight: torch.Tensor, stats: dict[str, torch.Tensor], budget: LayerBudget, settings: HassleSettings
) -> Decomposition:
    """OATS at the same budget as the first iterate, then S/L alternation in the full Hessian metric."""
    warm = run_oats(weight, stats, budget, settings) if budget.rank > 0 else None
    return quantized_hessian_sparse_low_rank(
        weight,
        hessian_metric(stats[HESSIAN], shrinkage=_shrinkage(weight, budget, settings)),
        budget.values,
        budget.factors,
        rank=budget.rank,
        sparsity=None if budget.nm is not None else budget.layer_sparsity(weight.shape[1]),
        nm=budget.nm,
        iterations=settings.hessian_iterations if budget.rank > 0 else 1,  # L = 0: every pass would be the same
        warm_start=warm,
    )


def _shrinkage(weight: torch.Tensor, budget: LayerBudget, settings: HassleSettings) -> float:
    """The configured λ, or the default for the rate this layer's budget actually removes."""
    if settings.hessian_shrinkage is not None:
        return settings.hessian_shrinkage
    d_out, d_in = weight.shape
    return default_shrinkage(1.0 - budget.num_parameters(d_out, d_in) / (d_out * d_in))


HASSLE = Algorithm(
    "hassle",
    "Hessian-aware sparse + low-rank (OATS start, SparseGPT / weighted-SVD alternation)",
    (HESSIAN, INPUT_NORMS),
    uses_low_rank=True,
    run=run_hassle,
    settings=HassleSettings,
    quantizes_jointly=True,
)
