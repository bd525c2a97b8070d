"""The fast OATS solver (`solver="fast"`): same budget and nearly the same error as the exact one, in less work."""

import pytest
import torch

from optimum_oats.algorithms import (
    ALGORITHMS,
    INPUT_NORMS,
    SOLVERS,
    OATSSettings,
    layer_budget,
    oats_decompose,
    truncated_svd,
)
from optimum_oats.algorithms.masks import sparsity_mask
from optimum_oats.algorithms.oats import _power_steps, ritz_step, warm_sparsity_mask
from optimum_oats.config import OATSConfig
from tests.helpers.structured import structured_matrix


def _structured_matrix(d_out=96, d_in=128, rank=6, seed=0):
    return structured_matrix(d_out, d_in, rank, seed)


def _scaled_error(weight, out, norms):
    approx = out.sparse + out.lowrank_u @ out.lowrank_v
    return float(((weight - approx) * norms).norm() / (weight * norms).norm())


@pytest.mark.parametrize("shape", [(96, 128), (128, 96)])  # wide and tall: the Ritz step works on the short side
@pytest.mark.parametrize("rate", [0.3, 0.5, 0.7])
def test_fast_error_matches_exact(shape, rate):
    weight, norms = _structured_matrix(*shape, seed=1)
    budget = layer_budget(*shape, rate, 0.25)
    kwargs = dict(rank=budget.rank, keep_per_row=budget.keep_per_row, iterations=40)
    exact = _scaled_error(weight, oats_decompose(weight, norms, solver="exact", **kwargs), norms)
    fast = _scaled_error(weight, oats_decompose(weight, norms, solver="fast", **kwargs), norms)
    assert fast <= 1.01 * exact


def test_first_step_is_the_exact_one():
    weight, norms = _structured_matrix(seed=7)
    exact = oats_decompose(weight, norms, rank=5, keep_per_row=40, iterations=1, solver="exact")
    fast = oats_decompose(weight, norms, rank=5, keep_per_row=40, iterations=1, solver="fast")
    assert torch.equal(exact.sparse, fast.sparse) and torch.equal(exact.lowrank_u, fast.lowrank_u)


def test_fast_objective_never_rises():
    weight, norms = _structured_matrix(seed=3)
    out = oats_decompose(weight, norms, rank=6, keep_per_row=30, iterations=40, solver="fast", tol=0, track_error=True)
    history = torch.tensor(out.history)
    assert len(history) == out.iterations == 40
    assert (history[1:] <= history[:-1] * (1 + 1e-5) + 1e-7).all()
    assert history[-1] < history[0]


def test_fast_is_deterministic():
    """No random start (the first step is an exact SVD), so two runs agree bit for bit."""
    weight, norms = _structured_matrix(seed=4)
    a, b = (oats_decompose(weight, norms, rank=5, keep_per_row=40, iterations=8, solver="fast") for _ in "ab")
    assert torch.equal(a.sparse, b.sparse) and torch.equal(a.lowrank_u, b.lowrank_u)
    assert torch.equal(a.lowrank_v, b.lowrank_v) and a.iterations == b.iterations


@pytest.mark.parametrize("nm", [None, (2, 8)])
def test_fast_keeps_the_exact_budget(nm):
    weight, norms = _structured_matrix(seed=2)
    budget = layer_budget(96, 128, 0.5, 0.25, nm)
    kwargs = dict(rank=budget.rank, keep_per_row=budget.keep_per_row, nm=nm, iterations=10)
    exact = oats_decompose(weight, norms, solver="exact", **kwargs)
    fast = oats_decompose(weight, norms, solver="fast", **kwargs)
    assert fast.lowrank_u.shape == exact.lowrank_u.shape and fast.lowrank_v.shape == exact.lowrank_v.shape
    assert torch.equal((fast.sparse != 0).sum(1), (exact.sparse != 0).sum(1))
    assert torch.linalg.matrix_rank(fast.lowrank_u @ fast.lowrank_v) <= budget.rank
    if nm is not None:
        assert ((fast.sparse != 0).view(96, -1, 8).sum(-1) == 2).all()
    assert _scaled_error(weight, fast, norms) <= 1.01 * _scaled_error(weight, exact, norms)


def test_early_stop_on_an_easy_matrix():
    """Exactly low-rank + row-sparse: the support settles at once and the error stalls, so the loop stops."""
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(64, 3, generator=g) @ torch.randn(3, 96, generator=g)
    spikes = torch.zeros(64, 96).scatter_(1, torch.rand(64, 96, generator=g).argsort(1)[:, :8], 3.0)
    weight, norms = low_rank + spikes, torch.ones(96)
    fast = oats_decompose(weight, norms, rank=3, keep_per_row=8, solver="fast")
    assert fast.iterations < 80
    assert _scaled_error(weight, fast, norms) < 1e-5
    exact = oats_decompose(weight, norms, rank=3, keep_per_row=8, solver="exact")
    assert exact.iterations == 80  # the exact solver keeps the reference's fixed count unless given `tol`
    assert oats_decompose(weight, norms, rank=3, keep_per_row=8, tol=1e-5, solver="exact").iterations < 80


def test_rank_zero_is_the_same_for_both_solvers():
    weight, norms = _structured_matrix(seed=5)
    fast = oats_decompose(weight, norms, rank=0, keep_per_row=16, solver="fast")
    exact = oats_decompose(weight, norms, rank=0, keep_per_row=16, solver="exact")
    assert torch.equal(fast.sparse, exact.sparse) and fast.lowrank_u is None


def test_rank_deficient_input_stays_finite():
    """More Ritz vectors than the matrix has rank: no division by a zero singular value."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 2, generator=g) @ torch.randn(2, 60, generator=g)
    out = oats_decompose(weight, torch.ones(60), rank=4, keep_per_row=5, iterations=5, solver="fast", tol=0)
    assert torch.isfinite(out.lowrank_u).all() and torch.isfinite(out.lowrank_v).all()
    assert _scaled_error(weight, out, torch.ones(60)) < 1e-3


def test_ritz_step_converges_to_the_truncated_svd_and_never_loses_ground():
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(50, 80, generator=g) * torch.logspace(0, -2, 80)
    basis, errors = torch.randn(80, 12, generator=g), []
    for _ in range(30):
        u, v, basis, _ = ritz_step(matrix, basis, 6)
        errors.append(float((matrix - u @ v).norm()))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:], strict=False))
    best_u, best_v = truncated_svd(matrix, 6)
    assert errors[-1] <= float((matrix - best_u @ best_v).norm()) * (1 + 1e-4)


def test_power_steps_repeat_only_while_they_pay():
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(50, 80, generator=g) * torch.logspace(0, -2, 80)
    basis = torch.randn(80, 12, generator=g)
    one_u, one_v, _, _ = ritz_step(matrix, basis, 6)
    one_error = float((matrix - one_u @ one_v).norm())
    # The previous L was far off (S jumped): keep stepping (up to FAST_MAX_STEPS) and get closer.
    u, v, _ = _power_steps(matrix, basis, 6, stale=float("inf"))
    assert float((matrix - u @ v).norm()) < one_error
    # The first step gained nothing over the previous L (S settled): stop after it.
    u, v, _ = _power_steps(matrix, basis, 6, stale=one_error**2)
    assert torch.equal(u, one_u) and torch.equal(v, one_v)


@pytest.mark.parametrize("nm", [None, (2, 8)])
def test_warm_mask_equals_the_plain_mask(nm):
    g = torch.Generator().manual_seed(0)
    scores, threshold = torch.rand(30, 64, generator=g), None
    for _ in range(6):  # small drifts between calls, as between OATS iterations
        mask, threshold = warm_sparsity_mask(scores, 20, nm, threshold)
        assert torch.equal(mask, sparsity_mask(scores, 20, nm))
        scores = (scores + 0.02 * torch.randn(30, 64, generator=g)).abs()


def test_warm_mask_keeps_exactly_k_when_scores_tie_at_the_boundary():
    """The CPU selection (`numpy.partition` + midpoint) cannot separate equal scores; tied rows fall back to topk."""
    scores = torch.rand(12, 40, generator=torch.Generator().manual_seed(1))
    scores[::2, :10] = 0.5  # ten equal scores straddle the 20th place of every other row
    scores[::2, 10:29] = 0.9
    scores[::2, 29:] = 0.1
    mask, threshold = warm_sparsity_mask(scores, 20, None, None)
    mask, threshold = warm_sparsity_mask(scores + 1e-9, 20, None, threshold)
    assert (mask.sum(1) == 20).all()
    assert torch.equal(mask[1::2], sparsity_mask(scores, 20)[1::2])


def test_registry_passes_the_solver_from_the_config():
    weight, norms = _structured_matrix(seed=6)
    budget = layer_budget(96, 128, 0.5, 0.25)
    settings = OATSConfig(method_settings={"solver": "fast", "num_iterations": 12}).method_settings
    out = ALGORITHMS["oats"].run(weight, {INPUT_NORMS: norms}, budget, settings)
    direct = oats_decompose(
        weight, norms, rank=budget.rank, keep_per_row=budget.keep_per_row, iterations=12, solver="fast"
    )
    assert torch.equal(out.sparse, direct.sparse)
    exact = ALGORITHMS["oats"].run(
        weight, {INPUT_NORMS: norms}, budget, OATSSettings(num_iterations=12, solver="exact")
    )
    assert exact.iterations == 12 and not torch.equal(exact.sparse, out.sparse)


def test_invalid_solver_and_tolerance_are_rejected():
    weight, norms = _structured_matrix()
    with pytest.raises(ValueError, match="`solver` must be one of"):
        oats_decompose(weight, norms, rank=2, keep_per_row=10, solver="magic")
    with pytest.raises(ValueError, match="`tol` must be >= 0"):
        oats_decompose(weight, norms, rank=2, keep_per_row=10, solver="fast", tol=-1.0)


def test_fast_solver_end_to_end(tiny_configs, tokenizer, calibration_texts):
    """`OATSSettings(solver="fast")` reaches `oats_decompose` through `compress`: same layer budgets, same quality."""
    from optimum_oats import compress, compression_report
    from tests.helpers.tiny_models import build_tiny_model

    reports, layer_maps = {}, {}
    for svd in SOLVERS:
        torch.manual_seed(0)
        model = build_tiny_model(tiny_configs["llama"])
        settings = OATSSettings(num_iterations=20, solver=svd)
        config = OATSConfig(method_settings=settings, dataset=calibration_texts, num_samples=2, seqlen=32)
        compress(model, config, tokenizer, progress=False)
        reports[svd] = compression_report(model)
        layer_map = model.config.quantization_config.layer_map
        layer_maps[svd] = {name: (entry["rank"], entry["nnz"]) for name, entry in layer_map.items()}
    assert layer_maps["fast"] == layer_maps["exact"]
    assert reports["fast"].kept_fraction == reports["exact"].kept_fraction
    assert reports["fast"].mean_relative_error <= 1.02 * reports["exact"].mean_relative_error


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_compiled_threshold_step_equals_the_pytorch_one(monkeypatch, nm):
    """The one-pass C++ step keeps the same entries, thresholds and norms as the PyTorch path, warm or cold."""
    from optimum_oats.algorithms.oats import ThresholdState, threshold_step
    from optimum_oats.kernels import DISABLE_ENV, kernel_available

    assert kernel_available()  # CI has a compiler: the compiled path must really run here
    g = torch.Generator().manual_seed(3)
    scaled = torch.randn(40, 64, generator=g)
    residuals = [scaled - 0.3 * torch.randn(40, 64, generator=g) for _ in range(4)]
    residuals[2][5, :30] = residuals[2][5, 0]  # exact ties at a row's boundary
    compiled, plain = ThresholdState(), ThresholdState()
    for step, residual in enumerate(residuals):
        monkeypatch.delenv(DISABLE_ENV, raising=False)
        ours = threshold_step(residual.clone(), scaled, 24, nm, compiled)
        monkeypatch.setenv(DISABLE_ENV, "1")
        reference = threshold_step(residual.clone(), scaled, 24, nm, plain)
        untied = torch.ones(40, dtype=torch.bool)
        untied[5] = step != 2  # row 5 of the third residual ties: both keep exactly k there, possibly different ones
        assert torch.equal(ours[1][untied], reference[1][untied])  # the support
        assert torch.equal(ours[0][untied], reference[0][untied])  # S
        assert torch.equal(ours[3][untied], reference[3][untied])  # W_s - S
        assert ours[2] == pytest.approx(reference[2], rel=1e-5)  # ||R - S||^2: tied entries have equal |r|
        if untied.all():
            assert ours[4] == pytest.approx(reference[4], rel=1e-5)  # ||W_s - S||^2
        assert torch.equal(compiled.threshold, plain.threshold)
        assert (ours[1].reshape(-1, nm[1] if nm else 64).sum(1) == (nm[0] if nm else 24)).all()


def test_fast_solver_is_the_same_with_and_without_the_compiled_step(monkeypatch):
    from optimum_oats.kernels import DISABLE_ENV

    weight, norms = _structured_matrix(seed=4)
    kwargs = dict(rank=5, keep_per_row=50, iterations=30, solver="fast", tol=0)
    compiled = oats_decompose(weight, norms, **kwargs)
    monkeypatch.setenv(DISABLE_ENV, "1")
    plain = oats_decompose(weight, norms, **kwargs)
    assert torch.equal(compiled.sparse != 0, plain.sparse != 0)
    torch.testing.assert_close(compiled.sparse, plain.sparse)
