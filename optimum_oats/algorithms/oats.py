"""OATS: outlier-aware sparse + low-rank decomposition by alternating thresholding.

Zhang & Papyan, "OATS: Outlier-Aware Pruning Through Sparse and Low Rank Decomposition", ICLR 2025
(https://arxiv.org/abs/2409.13652).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..utils.settings import check_choice, check_int, setting
from .budget import LayerBudget
from .masks import check_nm_width, rowwise_topk_mask, sparsity_mask
from .method import INPUT_NORMS, Algorithm

OATS_PRECISION = torch.float32
SOLVERS = ("exact", "fast")
# The solver compressions use unless told otherwise (`OATSSettings.solver`); "exact" is the reference iteration.
DEFAULT_SOLVER = "fast"
DEFAULT_ITERATIONS = 80  # the reference code's count
# Early-stopping tolerance of the fast solver: stop once the support of S is unchanged and the objective fell by
# less than this fraction in one iteration. The exact solver keeps the reference's fixed count (`tol=0`).
FAST_TOL = 1e-5
# Extra Ritz vectors carried by the fast solver, so the top-r subspace is still tracked when singular values
# near the r-th one cross as S changes.
FAST_OVERSAMPLE = 8
# The fast solver takes another power step (at most FAST_MAX_STEPS per iteration) while the last one still cut the
# rank-r residual by more than this fraction: in the first iterations S jumps and one step lags behind the exact
# SVD, which costs final error; later one step suffices.
FAST_STEP_GAIN = 1e-2
FAST_MAX_STEPS = 4


@dataclass
class Decomposition:
    """`W ≈ sparse + lowrank_u @ lowrank_v`; `sparse` is dense with zeros where pruned.

    `iterations` counts the alternating steps actually run: fewer than asked when stopped early. A quantized
    decomposition (`algorithms/quantize.py`) holds on-grid values and the fp16-exact group scales of each quantized
    part (`value_scales` of S, `lowrank_u_scales`, `lowrank_v_scales`); None where a part is not quantized.
    """

    sparse: torch.Tensor
    lowrank_u: torch.Tensor | None = None
    lowrank_v: torch.Tensor | None = None
    history: list[float] = field(default_factory=list)
    iterations: int = 0
    value_scales: torch.Tensor | None = None
    lowrank_u_scales: torch.Tensor | None = None
    lowrank_v_scales: torch.Tensor | None = None


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation as factors `(U Σ, V^T)` by a full thin SVD (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def safe_input_norms(input_norms: torch.Tensor) -> torch.Tensor:
    """Input-column norms with dead features lifted off zero, so unscaling never divides by zero."""
    floor = input_norms.max().clamp_min(1e-12) * 1e-6
    return input_norms.clamp_min(floor)


def ritz_step(
    matrix: torch.Tensor, basis: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors `(U Σ, V^T)` of `matrix` from one block power step on `basis` plus Rayleigh–Ritz.

    Two `(m, n) x (n, k)` products replace a full SVD. The result is never worse than the best approximation
    whose singular subspace on the long side is spanned by the first `rank` columns of `basis` (the power step's
    range contains that approximation's other side), so warm-starting from the previous iteration's Ritz vectors
    keeps the OATS objective from rising while S changes slowly.

    Args:
        matrix: `(m, n)`.
        basis: `(max(m, n), k)` with `rank <= k <= min(m, n)`: spans the singular subspace on the long side
            (right if `m <= n`, left otherwise), as returned by the previous call; need not be orthonormal.

    Returns:
        `(U Σ (m, rank), V^T (rank, n), next basis (max(m, n), k), Σ (rank,) in float64)`.
    """
    transposed = matrix.shape[0] > matrix.shape[1]
    work = matrix.T if transposed else matrix  # short side first: the QR and Ritz vectors cost O(min(m, n) k^2)
    q = torch.linalg.qr(work @ basis).Q
    projected = (q.T @ work).double()  # (k, long); its small eigenproblem in float64 is cheap and accurate
    eigenvalues, eigenvectors = torch.linalg.eigh(projected @ projected.T)
    singular = eigenvalues.flip(0).clamp_min(0).sqrt()
    eigenvectors = eigenvectors.flip(1)
    floor = singular[:1] * 1e-7 + 1e-30  # rank-deficient directions: bounded vectors, not a division by zero
    long_vectors = (projected.T @ eigenvectors / torch.maximum(singular, floor)).to(matrix.dtype)
    short_vectors = q @ eigenvectors[:, :rank].to(matrix.dtype)
    scale = singular[:rank].to(matrix.dtype)
    if transposed:
        return long_vectors[:, :rank] * scale, short_vectors.T, long_vectors, singular[:rank]
    return short_vectors * scale, long_vectors[:, :rank].T, long_vectors, singular[:rank]


def warm_sparsity_mask(
    scores: torch.Tensor, keep_per_row: int, nm: tuple[int, int] | None, threshold: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`sparsity_mask`] reusing last iteration's per-group thresholds; also returns the thresholds for the next.

    When exactly `keep` scores of a group (a row, or `M` consecutive entries for N:M) exceed the old threshold,
    they are its top `keep`; only the other groups need a `topk`, which dominated the fast solver's time.

    Args:
        scores: `(d_out, d_in)`.
        threshold: per group, from the previous call (`None` the first time).
    """
    if threshold is None:
        mask = sparsity_mask(scores, keep_per_row, nm)  # also validates keep_per_row / N:M
        groups, group_mask = _grouped(scores, nm), _grouped(mask, nm)
        lowest_kept = groups.masked_fill(~group_mask, float("inf")).amin(1)
        highest_dropped = groups.masked_fill(group_mask, float("-inf")).amax(1)
        return mask, (lowest_kept + highest_dropped) / 2
    groups, keep = _grouped(scores, nm), (nm[0] if nm is not None else keep_per_row)
    group_mask = groups > threshold[:, None]
    redo = (_row_counts(group_mask) != keep).nonzero().squeeze(1)
    if redo.numel():
        threshold = threshold.clone()
        group_mask[redo], threshold[redo] = _topk_and_midpoints(groups[redo], keep)
    return group_mask.reshape(scores.shape), threshold


def _row_counts(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row; summing the bytes into int32 avoids `sum`'s int64 copy of the whole mask."""
    return mask.view(torch.uint8).sum(1, dtype=torch.int32)


def _grouped(matrix: torch.Tensor, nm: tuple[int, int] | None) -> torch.Tensor:
    return matrix.reshape(-1, nm[1]) if nm is not None else matrix


def _topk_and_midpoints(groups: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`keep` mask of each row, and the midpoint between its `keep`-th and `keep+1`-th scores.

    The midpoint leaves the widest margin for the next iteration. On CPU one `numpy.partition` (introselect)
    finds the boundary ~9x faster than `torch.topk`, which dominated the fast solver's time; rows whose boundary
    scores tie fall back to `topk`, so exactly `keep` entries are kept either way.
    """
    if not 0 < keep < groups.shape[1]:  # all or nothing kept: any threshold outside the scores separates them
        fill = float("-inf") if keep else float("inf")
        return rowwise_topk_mask(groups, keep), groups.new_full((groups.shape[0],), fill)
    if not _on_host(groups):  # on an accelerator: stay on the device (no numpy, no copy to the host)
        values, indices = groups.topk(keep + 1, dim=1, sorted=False)
        boundary = values.topk(2, dim=1, largest=False)  # the (keep+1)-th and the keep-th largest
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, indices, True)
        mask.scatter_(1, indices.gather(1, boundary.indices[:, :1]), False)
        return mask, boundary.values.sum(1) / 2
    dropped = groups.shape[1] - keep
    partitioned = torch.from_numpy(np.partition(groups.numpy(), dropped - 1, axis=1))
    threshold = (partitioned[:, dropped - 1] + partitioned[:, dropped:].amin(1)) / 2
    mask = groups > threshold[:, None]
    ties = (_row_counts(mask) != keep).nonzero().squeeze(1)
    if ties.numel():
        mask[ties] = rowwise_topk_mask(groups[ties], keep)
    return mask, threshold


def oats_decompose(
    weight: torch.Tensor,
    input_norms: torch.Tensor,
    *,
    rank: int,
    keep_per_row: int,
    nm: tuple[int, int] | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    track_error: bool = False,
    solver: str = DEFAULT_SOLVER,
    tol: float | None = None,
) -> Decomposition:
    """Decompose `weight` into sparse + low-rank after scaling columns by the inputs' norms.

    In the scaled space `W_s = W diag(D)` alternate, for at most `iterations` steps:
    `L = best rank-r approximation of (W_s - S)`, then `S = row-wise hard threshold of (W_s - L)`
    (top-`keep_per_row` entries of each row, or N:M). Both terms are finally unscaled by `D`.

    `solver="exact"` takes a full thin SVD every step, as the reference code does. `solver="fast"` takes it once,
    then replaces it by warm-started block power steps with Rayleigh–Ritz ([`ritz_step`]): S moves little between
    steps, so the last subspace is nearly right and `O(m n r)` work per step suffices (a few steps while S still
    jumps, then one). The top-k of the threshold step is warm-started too. Every step still lowers the
    objective, and on SmolLM2 weights the final error matches the exact solver's within the iteration's own
    run-to-run sensitivity at several times the speed.

    Args:
        weight: `(d_out, d_in)`.
        input_norms: `(d_in,)`, `D_j = ||X_j||_2` over all calibration tokens.
        rank: rank r of the low-rank term (0 gives a Wanda-scored pruning).
        keep_per_row: entries of S kept per row (ignored when `nm` is given).
        nm: `(N, M)` pattern for S.
        iterations: most alternating steps (the reference code runs 80 with no early stop).
        track_error: record `||W_s - S - L||_F / ||W_s||_F` after every iteration in `history`.
        solver: `"exact"` (full SVD) or `"fast"` (warm-started subspace iteration).
        tol: stop once the support of S did not change and the error fell by less than this fraction in one
            step; `0` never stops early. `None`: `0` for `"exact"` (the reference behaviour), [`FAST_TOL`] for
            `"fast"`.

    Returns:
        [`Decomposition`] with `sparse (d_out, d_in)`, `lowrank_u (d_out, r)`, `lowrank_v (r, d_in)` in
        float32, and `iterations`, the steps run.
    """
    check_choice("solver", solver, SOLVERS)
    tol = (FAST_TOL if solver == "fast" else 0.0) if tol is None else tol
    if not tol >= 0:
        raise ValueError(f"`tol` must be >= 0, got {tol}.")
    norms = safe_input_norms(input_norms.to(device=weight.device, dtype=OATS_PRECISION))
    scaled = weight.to(OATS_PRECISION) * norms
    if rank == 0:
        sparse = scaled * sparsity_mask(scaled.abs(), keep_per_row, nm)
        return Decomposition(sparse=sparse / norms)

    fast = solver == "fast"
    state = ThresholdState()
    sparse = torch.zeros_like(scaled)
    residual = torch.empty_like(scaled)
    history: list[float] = []
    scale = float(scaled.norm())
    previous_error, previous_mask = float("inf"), None
    work, work_energy = scaled, None  # `W_s - S` and its energy, set by each fast thresholding step
    steps = 0
    while steps < iterations:
        steps += 1
        if fast and steps == 1:
            u, v, basis = _exact_start(scaled, rank)
        elif fast:  # `previous_error` is `||W_s - S - L_old|| / ||W_s||`: what the new L must beat
            u, v, basis = _power_steps(work, basis, rank, (previous_error * scale) ** 2, work_energy)
        else:
            u, v = truncated_svd(scaled - sparse, rank)
        torch.addmm(scaled, u, v, alpha=-1, out=residual)
        if fast:
            sparse, mask, dropped, work, work_energy = threshold_step(residual, scaled, keep_per_row, nm, state)
            error = dropped**0.5 / scale
        else:
            mask = sparsity_mask(residual.abs(), keep_per_row, nm)
            sparse = residual * mask
            if track_error or tol:
                error = float(residual.sub_(sparse).norm()) / scale  # the residual is not needed past this point
        if fast or track_error or tol:
            if track_error:
                history.append(error)
            if tol and previous_mask is not None and previous_error - error <= tol * previous_error:
                if torch.equal(mask, previous_mask):
                    break
            previous_error, previous_mask = error, mask
    return Decomposition(sparse=sparse / norms, lowrank_u=u, lowrank_v=v / norms, history=history, iterations=steps)


@dataclass
class ThresholdState:
    """What the fast solver's thresholding carries from one iteration to the next.

    `threshold` holds each group's last boundary (see [`warm_sparsity_mask`]); `buffers` are reused outputs, since
    fresh multi-megabyte tensors every iteration cost page faults comparable to the thresholding itself.
    """

    threshold: torch.Tensor | None = None
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def buffer(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.empty_like(like, dtype=dtype)
        return self.buffers[name]


def threshold_step(
    residual: torch.Tensor,
    scaled: torch.Tensor,
    keep_per_row: int,
    nm: tuple[int, int] | None,
    state: ThresholdState,
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, float]:
    """The fast solver's thresholding half: S from `R = W_s - L`, with what the next iteration needs.

    Uses the compiled one-pass kernel (optimum_oats/kernels/oats_threshold.cpp) when it is available, else
    [`warm_sparsity_mask`] and PyTorch ops; both keep the same entries. `residual` may be overwritten, and the
    returned tensors are reused by the call after next (the mask) or the next call (the others).

    Returns:
        `(S, support mask, ||R - S||^2, W_s - S, ||W_s - S||^2)`.
    """
    kernel = _threshold_kernel(residual)
    if kernel is None:
        mask, state.threshold = warm_sparsity_mask(residual.abs(), keep_per_row, nm, state.threshold)
        sparse = residual * mask
        work = scaled - sparse
        dropped = _squared_norm(residual.sub_(sparse))
        return sparse, mask, dropped, work, _squared_norm(work)
    width, keep = (nm[1], nm[0]) if nm is not None else (residual.shape[1], keep_per_row)
    if nm is not None:
        check_nm_width(residual.shape[1], nm[1])
    elif not 0 <= keep <= width:
        raise ValueError(f"`keep_per_row` must be in [0, {width}], got {keep}.")
    groups = residual.numel() // width
    if state.threshold is None:
        state.threshold = residual.new_full((groups,), float("nan"))  # NaN: no boundary known yet
    sparse, work = state.buffer("sparse", residual), state.buffer("work", residual)
    mask = state.buffer("mask", residual, torch.bool)  # two masks alternate: the caller compares with the last
    state.buffers["mask"], state.buffers["last_mask"] = state.buffer("last_mask", residual, torch.bool), mask
    flat = (groups, width)
    dropped, work_energy = kernel.oats_threshold_step(
        residual.view(flat),
        scaled.view(flat),
        keep,
        state.threshold,
        sparse.view(flat),
        mask.view(flat),
        work.view(flat),
    )
    return sparse, mask, dropped, work, work_energy


def _on_host(tensor: torch.Tensor) -> bool:
    """Whether the CPU-only helpers (numpy partition, the C++ thresholding kernel) may run on `tensor`.

    The one place the solver branches on the device, so a test can take the accelerator path on CPU tensors.
    """
    return tensor.device.type == "cpu"


def _threshold_kernel(residual: torch.Tensor):
    if not _on_host(residual) or residual.dtype != torch.float32:
        return None
    from ..kernels import load_kernel  # lazy: building the extension is only worth it once a solve runs

    return load_kernel()


def _squared_norm(matrix: torch.Tensor) -> float:
    """`||matrix||_F^2` from fp32 row norms summed in fp64: a whole-matrix fp32 norm is off by ~1e-5, which
    misjudges [`_power_steps`]'s gain test (the residual is ~1% of the energy)."""
    return float(torch.linalg.vector_norm(matrix, dim=1).double().square().sum())


def _power_steps(
    matrix: torch.Tensor, basis: torch.Tensor, rank: int, stale: float, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[`ritz_step`]s until one cuts the rank-`rank` residual by less than [`FAST_STEP_GAIN`] of itself.

    `stale` is `||matrix - L_old||_F^2` for the previous iteration's L. The residual of a Ritz approximation is
    `||matrix||^2 - Σ σ_i^2` (`energy` is `||matrix||^2`, computed here when not given), so each step's progress
    costs one norm, not another product.
    """
    energy = _squared_norm(matrix) if energy is None else energy
    for _ in range(FAST_MAX_STEPS):
        u, v, basis, singular = ritz_step(matrix, basis, rank)
        remaining = energy - float(singular.square().sum())
        if stale - remaining <= FAST_STEP_GAIN * remaining:
            break
        stale = remaining
    return u, v, basis


def _exact_start(scaled: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First step of the fast solver: one full SVD, so the first support of S is the exact solver's.

    A cheaper randomized start picks a slightly different first support, and the thresholding path never
    recovers from it (on SmolLM2 weights up to +1.5% final error, against +0.3% from an exact start).
    """
    u, s, vh = torch.linalg.svd(scaled, full_matrices=False)
    width = min(rank + FAST_OVERSAMPLE, *scaled.shape)
    basis = u[:, :width] if scaled.shape[0] > scaled.shape[1] else vh[:width].T
    return u[:, :rank] * s[:rank], vh[:rank], basis


@dataclass
class OATSSettings:
    """OATS's own settings (`OATSConfig(method="oats", method_settings=OATSSettings(...))`).

    Args:
        num_iterations (`int`, defaults to 80): most alternating-thresholding iterations (the reference runs 80).
        solver (`str`, defaults to `"fast"`): how the rank-r step is solved, `"exact"` (a full thin SVD every
            iteration, as the reference does) or `"fast"` (warm-started; see [`oats_decompose`], and
            `benchmarks/oats_solver.py` to compare both). It was `OATSConfig(svd=...)` before this class existed.
    """

    num_iterations: int = setting(DEFAULT_ITERATIONS, "Most alternating-thresholding iterations of OATS", "N")
    solver: str = setting(DEFAULT_SOLVER, f"Rank-r solver inside OATS: one of {SOLVERS}", "SOLVER")

    def __post_init__(self) -> None:
        self.num_iterations = check_int("num_iterations", self.num_iterations, 1)
        check_choice("solver", self.solver, SOLVERS)


def run_oats(
    weight: torch.Tensor, stats: dict[str, torch.Tensor], budget: LayerBudget, settings: OATSSettings
) -> Decomposition:
    return oats_decompose(
        weight,
        stats[INPUT_NORMS],
        rank=budget.rank,
        keep_per_row=budget.keep_per_row,
        nm=budget.nm,
        iterations=settings.num_iterations,
        solver=settings.solver,
    )


OATS = Algorithm(
    "oats",
    "OATS, sparse + low-rank",
    (INPUT_NORMS,),
    uses_low_rank=True,
    run=run_oats,
    rows_balanced=True,
    settings=OATSSettings,
)
