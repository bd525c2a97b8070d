import pytest
import torch

from optimum_oats.algorithms import layer_budget, oats_decompose, wanda_prune
from tests.helpers.structured import structured_matrix as _structured_matrix


def _scaled_error(weight, approx, norms):
    return float(((weight - approx) * norms).norm() / (weight * norms).norm())


def test_shapes_budget_and_rank_bound():
    weight, norms = _structured_matrix()
    budget = layer_budget(48, 64, 0.5, 0.25)
    out = oats_decompose(
        weight, norms, rank=budget.rank, keep_per_row=budget.keep_per_row, iterations=10, solver="exact"
    )
    assert out.lowrank_u.shape == (48, budget.rank) and out.lowrank_v.shape == (budget.rank, 64)
    assert ((out.sparse != 0).sum(1) <= budget.keep_per_row).all()
    assert torch.linalg.matrix_rank(out.lowrank_u @ out.lowrank_v) <= budget.rank


def test_error_never_rises_over_iterations():
    weight, norms = _structured_matrix(seed=3)
    out = oats_decompose(weight, norms, rank=6, keep_per_row=20, iterations=30, track_error=True, solver="exact")
    history = torch.tensor(out.history)
    assert len(history) == 30
    assert (history[1:] <= history[:-1] + 1e-5).all()
    assert history[-1] < history[0]


def test_beats_wanda_at_the_same_budget():
    weight, norms = _structured_matrix(seed=1)
    budget = layer_budget(48, 64, 0.5, 0.25)
    out = oats_decompose(
        weight, norms, rank=budget.rank, keep_per_row=budget.keep_per_row, iterations=40, solver="exact"
    )
    oats_error = _scaled_error(weight, out.sparse + out.lowrank_u @ out.lowrank_v, norms)
    wanda_error = _scaled_error(weight, wanda_prune(weight, norms, keep_per_row=int(64 * 0.5)), norms)
    assert oats_error < 0.8 * wanda_error


def test_rank_zero_is_wanda():
    weight, norms = _structured_matrix(seed=2)
    out = oats_decompose(weight, norms, rank=0, keep_per_row=16, solver="exact")
    torch.testing.assert_close(out.sparse, wanda_prune(weight, norms, keep_per_row=16))
    assert out.lowrank_u is None


def test_nm_pattern_on_sparse_part():
    weight, norms = _structured_matrix(d_in=64)
    out = oats_decompose(weight, norms, rank=4, keep_per_row=0, nm=(2, 8), iterations=5)
    assert ((out.sparse != 0).view(48, -1, 8).sum(-1) <= 2).all()


def test_deterministic():
    weight, norms = _structured_matrix(seed=4)
    a = oats_decompose(weight, norms, rank=5, keep_per_row=20, iterations=8, solver="exact")
    b = oats_decompose(weight, norms, rank=5, keep_per_row=20, iterations=8, solver="exact")
    assert torch.equal(a.sparse, b.sparse) and torch.equal(a.lowrank_u, b.lowrank_u)


def test_dead_input_features_do_not_produce_nan():
    weight, norms = _structured_matrix(seed=5)
    norms[10] = 0.0
    out = oats_decompose(weight, norms, rank=4, keep_per_row=20, iterations=3, solver="exact")
    assert torch.isfinite(out.sparse).all() and torch.isfinite(out.lowrank_v).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_decomposed_in_float32(dtype):
    weight, norms = _structured_matrix(seed=6)
    out = oats_decompose(weight.to(dtype), norms, rank=4, keep_per_row=20, iterations=3)
    assert out.sparse.dtype == torch.float32
