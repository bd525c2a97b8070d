"""`method="hassle"`: sparse + low-rank in the full Hessian metric (issue 17)."""

from __future__ import annotations

import pytest
import torch

from optimum_oats import OATSConfig, compress
from optimum_oats.algorithms import (
    hessian_sparse_low_rank,
    layer_budget,
    oats_decompose,
    sparsegpt_prune,
)
from optimum_oats.algorithms.hessian_slr import (
    default_shrinkage,
    hessian_metric,
    hessian_objective,
    refit_on_support,
    shrink_hessian,
    weighted_low_rank,
)


def _problem(seed: int, d_out: int = 96, d_in: int = 128, structured: bool = True):
    """Correlated inputs with a few outlier features; a weight that is low rank + sparse + noise (as real layers
    are closer to than an i.i.d. matrix), or plain noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 0.4 * torch.randn(d_in, d_in, generator=g) / d_in**0.5
    X = torch.randn(1024, d_in, generator=g) @ mix
    X[:, :4] *= 15
    H = 2 * X.T @ X / X.shape[0]
    W = 0.1 * torch.randn(d_out, d_in, generator=g)
    if structured:
        W += torch.randn(d_out, 4, generator=g) @ torch.randn(4, d_in, generator=g) / 2
        W += torch.randn(d_out, d_in, generator=g) * (torch.rand(d_out, d_in, generator=g) < 0.05)
    return W, H, X


def _objective(W, H, out) -> float:
    approx = out.sparse + (out.lowrank_u @ out.lowrank_v if out.lowrank_u is not None else 0)
    return hessian_objective(W - approx, hessian_metric(H).hessian())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("warm", [False, True])
def test_objective_never_rises_across_iterations(seed, warm):
    W, H, X = _problem(seed, structured=seed != 2)
    budget = layer_budget(*W.shape, 0.6, 0.2)
    start = None
    if warm:
        oats = oats_decompose(W, X.norm(dim=0), rank=budget.rank, keep_per_row=budget.keep_per_row, iterations=10)
        start = oats
    out = hessian_sparse_low_rank(
        W, H, rank=budget.rank, sparsity=1 - budget.keep_per_row / W.shape[1], iterations=6, warm_start=start
    )
    assert 1 <= out.iterations == len(out.history) <= 6 + warm
    assert all(b <= a for a, b in zip(out.history, out.history[1:], strict=False))
    # The history is the objective of what is returned (dead inputs: none here).
    energy = hessian_objective(W, hessian_metric(H).hessian())
    assert _objective(W, H, out) / energy == pytest.approx(out.history[-1], rel=1e-4)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_rank_zero_one_iteration_is_sparsegpt_exactly(nm):
    W, H, _ = _problem(3)
    if nm is None:
        out = hessian_sparse_low_rank(W, H, rank=0, sparsity=0.6, iterations=1, refit_steps=0)
        expected = sparsegpt_prune(W, H, sparsity=0.6)
    else:
        out = hessian_sparse_low_rank(W, H, rank=0, nm=nm, iterations=1, refit_steps=0)
        expected = sparsegpt_prune(W, H, nm=nm)
    assert out.lowrank_u is None and out.lowrank_v is None
    assert torch.equal(out.sparse, expected)


def test_refit_lowers_the_error_at_every_step_and_keeps_the_support():
    W, H, _ = _problem(7)
    damped = hessian_metric(H).hessian()
    pruned = sparsegpt_prune(W, H, sparsity=0.7)
    errors = [hessian_objective(W - refit_on_support(W, pruned, damped, k), damped) for k in range(0, 8)]
    assert errors[0] == pytest.approx(hessian_objective(W - pruned, damped))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 0.97 * errors[0]
    refit = refit_on_support(W, pruned, damped, 10)
    assert torch.equal(refit != 0, pruned != 0)
    # Many steps reach the least-squares optimum on the support: the gradient there vanishes.
    exact = refit_on_support(W, pruned, damped, 400)
    assert (((W - exact) @ damped) * (pruned != 0)).abs().max() < 1e-3 * (W @ damped).abs().max()


def test_low_rank_step_is_the_exact_weighted_minimiser():
    """Against the same fit through the symmetric square root (`H^½ = Q Λ^½ Q^T`, EoRA's route): a different
    route, the same optimum."""
    W, H, _ = _problem(4)
    metric = hessian_metric(H)
    u, v = weighted_low_rank(W, metric, 5)
    eigvals, Q = torch.linalg.eigh(metric.hessian().double())
    root = Q * eigvals.sqrt()
    a, s, bh = torch.linalg.svd(W.double() @ root, full_matrices=False)
    best = (a[:, :5] * s[:5]) @ bh[:5] @ (Q / eigvals.sqrt()).T
    H_d = metric.hessian()
    assert hessian_objective(W - u @ v, H_d) == pytest.approx(hessian_objective(W - best.float(), H_d), rel=1e-4)
    for scale in (0.9, 1.1):  # and no nearby rank-5 point is better
        assert hessian_objective(W - scale * (u @ v), H_d) > hessian_objective(W - u @ v, H_d)


def test_beats_oats_and_sparsegpt_on_structured_layers():
    """The point of the method: in the output-error metric it is below both, at the same parameter budget."""
    wins = 0
    for seed in range(3):
        W, H, X = _problem(seed)
        budget = layer_budget(*W.shape, 0.6, 0.2)
        oats = oats_decompose(W, X.norm(dim=0), rank=budget.rank, keep_per_row=budget.keep_per_row, iterations=20)
        new = hessian_sparse_low_rank(
            W,
            H,
            rank=budget.rank,
            sparsity=1 - budget.keep_per_row / W.shape[1],
            iterations=3,
            warm_start=oats,
        )
        pruned = sparsegpt_prune(W, H, sparsity=0.6)
        new_error = _objective(W, H, new)
        wins += new_error < _objective(W, H, oats) and new_error < hessian_objective(W - pruned, H)
    assert wins == 3


@pytest.mark.parametrize("structured", [True, False])
def test_never_worse_than_its_warm_start(structured):
    """The first iterate is OATS polished in the Hessian metric (CG on its support, then the exact L-step), so
    the result can only improve on OATS, even where SparseGPT's greedy support would not (low ρ)."""
    W, H, X = _problem(8, structured=structured)
    budget = layer_budget(*W.shape, 0.3, 0.2)
    oats = oats_decompose(W, X.norm(dim=0), rank=budget.rank, keep_per_row=budget.keep_per_row, iterations=10)
    out = hessian_sparse_low_rank(
        W, H, rank=budget.rank, sparsity=1 - budget.keep_per_row / W.shape[1], iterations=2, warm_start=oats
    )
    metric = hessian_metric(H)
    polished = refit_on_support(W - oats.lowrank_u @ oats.lowrank_v, oats.sparse, metric.hessian(), 10)
    u, v = weighted_low_rank(W - polished, metric, budget.rank)
    energy = hessian_objective(W, metric.hessian())
    assert out.history[0] == pytest.approx(
        hessian_objective(W - polished - u @ v, metric.hessian()) / energy, rel=1e-4
    )
    assert out.history[0] < _objective(W, H, oats) / energy
    assert _objective(W, H, out) / energy <= out.history[0] * (1 + 1e-6)
    assert int((out.sparse != 0).sum()) <= budget.keep_per_row * W.shape[0]
    only = hessian_sparse_low_rank(
        W, H, rank=budget.rank, sparsity=1 - budget.keep_per_row / W.shape[1], iterations=0, warm_start=oats
    )
    assert only.history == out.history[:1] and torch.equal(only.sparse != 0, oats.sparse != 0)


def test_shrinkage_interpolates_to_the_diagonal_metric_of_oats():
    """λ scales the off-diagonal input correlations by 1 - λ; at λ = 1 the objective is OATS's own
    `||(W - Ŵ) D||_F²` with `D² = diag(H)` (no damping here, so the two are equal to rounding)."""
    W, H, _ = _problem(9)
    assert shrink_hessian(H, 0.0) is H
    half = shrink_hessian(H, 0.5)
    off = ~torch.eye(H.shape[0], dtype=torch.bool)
    assert torch.equal(half.diagonal(), H.diagonal()) and torch.allclose(half[off], 0.5 * H[off])
    assert torch.equal(shrink_hessian(H, 1.0), torch.diag(H.diagonal()))
    budget = layer_budget(*W.shape, 0.5, 0.1)
    out = hessian_sparse_low_rank(
        W, shrink_hessian(H, 1.0), rank=budget.rank, sparsity=1 - budget.keep_per_row / W.shape[1], percdamp=0.0
    )
    scale = H.diagonal().sqrt()
    error = ((W - out.sparse - out.lowrank_u @ out.lowrank_v) * scale).norm() ** 2 / (W * scale).norm() ** 2
    assert out.history[-1] == pytest.approx(float(error), rel=1e-4)
    full = hessian_sparse_low_rank(W, H, rank=budget.rank, sparsity=1 - budget.keep_per_row / W.shape[1])
    assert _objective(W, H, full) < _objective(W, H, out)  # each metric's minimiser wins in its own metric


@pytest.mark.parametrize("rate, expected", [(0.3, 0.5), (0.5, 0.5), (0.6, 0.0), (0.7, 0.0)])
def test_unset_shrinkage_follows_the_layer_rate(rate, expected):
    """`hessian_shrinkage=None` runs exactly what the measured default for the layer's rate gives explicitly."""
    from optimum_oats.algorithms import ALGORITHMS, HESSIAN, INPUT_NORMS, HassleSettings

    assert default_shrinkage(rate) == expected
    W, H, X = _problem(10, d_out=48, d_in=64)
    stats = {HESSIAN: H, INPUT_NORMS: X.norm(dim=0)}
    budget = layer_budget(*W.shape, rate, 0.3)
    assert budget.rank > 0
    settings = dict(num_iterations=5, solver="exact", hessian_iterations=1)
    run = ALGORITHMS["hassle"].run
    auto = run(W, stats, budget, HassleSettings(**settings, hessian_shrinkage=None))
    given = run(W, stats, budget, HassleSettings(**settings, hessian_shrinkage=expected))
    other = run(W, stats, budget, HassleSettings(**settings, hessian_shrinkage=0.5 - expected))
    assert torch.equal(auto.sparse, given.sparse) and torch.equal(auto.lowrank_v, given.lowrank_v)
    assert not torch.equal(auto.sparse, other.sparse)


def test_budget_and_dead_inputs():
    W, H, _ = _problem(5)
    H[7, :] = H[:, 7] = 0  # an input never active in calibration
    budget = layer_budget(*W.shape, 0.5, 0.2)
    out = hessian_sparse_low_rank(W, H, rank=budget.rank, sparsity=1 - budget.keep_per_row / W.shape[1])
    assert out.lowrank_u.shape == (W.shape[0], budget.rank) and out.lowrank_v.shape == (budget.rank, W.shape[1])
    assert int((out.sparse != 0).sum()) <= budget.keep_per_row * W.shape[0]
    assert not out.sparse[:, 7].any() and not out.lowrank_v[:, 7].any()


def test_bad_input_is_named():
    W, H, _ = _problem(6)
    with pytest.raises(ValueError, match="NaN/inf"):
        hessian_sparse_low_rank(W, H.clone().fill_(float("nan")), rank=2, sparsity=0.5)
    with pytest.raises(ValueError, match="`rank` must be in"):
        hessian_sparse_low_rank(W, H, rank=W.shape[0] + 1, sparsity=0.5)
    with pytest.raises(ValueError, match="not positive definite"):
        hessian_sparse_low_rank(W, -H, rank=2, sparsity=0.5)
    with pytest.raises(ValueError, match="refit_steps"):
        hessian_sparse_low_rank(W, H, rank=2, sparsity=0.5, refit_steps=-1)
    with pytest.raises(ValueError, match="exactly one of"):
        hessian_sparse_low_rank(W, H, rank=2)
    with pytest.raises(ValueError, match="hessian_iterations"):
        OATSConfig(method="hassle", method_settings={"hessian_iterations": -1})
    with pytest.raises(ValueError, match=r"`shrinkage` must be in \[0, 1\]"):
        shrink_hessian(H, 1.5)
    with pytest.raises(ValueError, match=r"`hessian_shrinkage` must be in \[0.0, 1.0\], got -0.1"):
        OATSConfig(method="hassle", method_settings={"hessian_shrinkage": -0.1})
    with pytest.raises(ValueError, match="polishes the warm start only"):
        hessian_sparse_low_rank(W, H, rank=2, sparsity=0.5, iterations=0)


def test_engine_error_names_the_layer(tiny_llama, tokenizer, calibration_texts, monkeypatch):
    """A failing layer is reported by name and method, with the algorithm's own explanation."""
    import optimum_oats.algorithms.hessian_slr as module

    def broken(hessian, percdamp=0.01, shrinkage=0.0):
        raise ValueError("The dampened Hessian is not positive definite; increase `percdamp`.")

    monkeypatch.setattr(module, "hessian_metric", broken)
    settings = {"num_iterations": 2}
    cfg = OATSConfig(method="hassle", method_settings=settings, dataset=calibration_texts, num_samples=2, seqlen=32)
    with pytest.raises(ValueError, match=r"`model\.layers\.0\.self_attn\.q_proj` \(hassle\): The dampened"):
        compress(tiny_llama, cfg, tokenizer, progress=False)


def test_the_metric_keeps_no_copy_and_equals_the_shrunk_hessian():
    """`hessian_metric(H, shrinkage=λ)` holds the caller's matrix itself (the memory bound of issue 17) and builds
    exactly the damped `shrink_hessian(H, λ)`; the decomposition is the same through either route."""
    W, H, _ = _problem(11)
    H[5, :] = H[:, 5] = 0  # a dead input: damping sets its diagonal to 1 in both routes
    metric = hessian_metric(H, shrinkage=0.5)
    assert metric.raw is H and metric.dead.nonzero().flatten().tolist() == [5]
    assert torch.equal(metric.hessian(), hessian_metric(shrink_hessian(H, 0.5)).hessian())
    assert torch.equal(metric.cholesky(), torch.linalg.cholesky(metric.hessian()))
    budget = layer_budget(*W.shape, 0.5, 0.2)
    args = dict(rank=budget.rank, sparsity=1 - budget.keep_per_row / W.shape[1], iterations=2)
    through_metric = hessian_sparse_low_rank(W, metric, **args)
    through_tensor = hessian_sparse_low_rank(W, shrink_hessian(H, 0.5), **args)
    assert torch.equal(through_metric.sparse, through_tensor.sparse)
    assert torch.equal(through_metric.lowrank_v, through_tensor.lowrank_v)
    assert through_metric.history == through_tensor.history
    with pytest.raises(ValueError, match=r"`shrinkage` must be in \[0, 1\]"):
        hessian_metric(H, shrinkage=-0.5)


def test_refit_in_row_batches_is_the_refit_of_all_rows(monkeypatch):
    """Rows are independent CG problems: batching them (the workspace bound) changes no result beyond rounding."""
    import optimum_oats.algorithms.hessian_slr as module

    W, H, _ = _problem(12, d_out=200)
    pruned = sparsegpt_prune(W, H, sparsity=0.6)
    damped = hessian_metric(H).hessian()
    whole = refit_on_support(W, pruned, damped, 8)
    monkeypatch.setattr(module, "ROW_CHUNK", 64)  # 200 rows: three full batches and a ragged one
    batched = refit_on_support(W, pruned, damped, 8)
    assert torch.equal(batched != 0, pruned != 0)
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-6)
    assert hessian_objective(W - batched, damped) == pytest.approx(hessian_objective(W - whole, damped), rel=1e-5)
