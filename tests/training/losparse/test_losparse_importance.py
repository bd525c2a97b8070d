import pytest
import torch

from optimum_oats.training.losparse.importance import row_sensitivity, select_rows, update_scores


def test_row_sensitivity_is_the_row_mean_of_abs_weight_times_grad():
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    grad = torch.tensor([[3.0, 1.0], [-4.0, 9.0]])
    assert torch.equal(row_sensitivity(weight, grad), torch.tensor([2.5, 1.0]))


def test_window_mean_then_ema():
    values = [torch.tensor([float(v)]) for v in (1, 2, 3, 10, 20, 30, 5)]
    window, ema = torch.zeros(1), torch.zeros(1)
    history = []
    for step, value in enumerate(values, start=1):
        window, ema = update_scores(window, ema, value, step, delta_t=3, beta1=0.85)
        history.append((float(window), float(ema)))
    # steps 1-3 form window 0 (mean 2), 4-6 window 1 (mean 20); each enters the EMA when the next one starts
    assert history[2] == pytest.approx((2.0, 0.0))
    assert history[3] == pytest.approx((10.0, 0.15 * 2.0))
    assert history[5][0] == pytest.approx(20.0)
    assert history[6] == pytest.approx((5.0, 0.85 * 0.3 + 0.15 * 20.0))


def test_row_mean_of_elementwise_scores_equals_rowwise_tracking():
    torch.manual_seed(0)
    steps = [(torch.randn(4, 6), torch.randn(4, 6)) for _ in range(7)]
    elem_window, elem_ema = torch.zeros(4, 6), torch.zeros(4, 6)
    row_window, row_ema = torch.zeros(4), torch.zeros(4)
    for step, (w, g) in enumerate(steps, start=1):
        elem_window, elem_ema = update_scores(elem_window, elem_ema, (w * g).abs(), step, 2, 0.85)
        row_window, row_ema = update_scores(row_window, row_ema, row_sensitivity(w, g), step, 2, 0.85)
    torch.testing.assert_close(elem_ema.mean(dim=1), row_ema)


def test_one_global_threshold_hits_the_parameter_target():
    torch.manual_seed(0)
    scores = [torch.rand(8), torch.rand(16) * 2, torch.rand(4) * 0.1]
    sizes = [10, 5, 40]
    alive = [torch.ones(8, dtype=torch.bool), torch.ones(16, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    total = sum(s.numel() * n for s, n in zip(scores, sizes, strict=True))
    keeps, threshold = select_rows(scores, sizes, alive, 0.5)
    kept = sum(int(k.sum()) * n for k, n in zip(keeps, sizes, strict=True))
    assert 0.5 * total - max(sizes) < kept <= 0.5 * total
    for s, k in zip(
        scores, keeps, strict=True
    ):  # one threshold for all layers: kept rows score >= it, pruned ones below
        assert (s[k] >= threshold).all()
    flat = torch.cat([torch.where(k, float("-inf"), s) for s, k in zip(scores, keeps, strict=True)])
    assert (flat <= threshold).all()
    assert int(keeps[1].sum()) > int(keeps[2].sum())  # layers are not pruned uniformly


def test_pruned_rows_are_never_revived():
    scores = [torch.tensor([5.0, 4.0, 3.0, 2.0])]
    alive = [torch.tensor([False, True, True, True])]
    keeps, _ = select_rows(scores, [1], alive, 0.5)
    assert keeps[0].tolist() == [False, True, True, False]
