import pytest
import torch

from optimum_oats.training.losparse.importance import new_state, row_scores, select_rows, sensitivity, update_scores


def test_row_sensitivity_is_the_row_mean_of_abs_weight_times_grad():
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    grad = torch.tensor([[3.0, 1.0], [-4.0, 9.0]])
    assert torch.equal(sensitivity(weight, grad, per_row=True), torch.tensor([2.5, 1.0]))
    assert torch.equal(sensitivity(weight, grad, per_row=False), torch.tensor([[3.0, 2.0], [2.0, 0.0]]))


def test_window_mean_then_ema_at_the_first_step_of_each_window():
    values = [torch.tensor([float(v)]) for v in (1, 2, 3, 10, 20, 30, 5)]
    state = new_state(values[0], beta2=1.0)
    history = []
    for step, value in enumerate(values):  # 0-based, as the reference's completed_steps
        update_scores(state, value, step, delta_t=3, beta1=0.85, beta2=1.0)
        history.append((float(state["window"]), float(state["ema"])))
    # steps 0-2 form window 0 (mean 2), 3-5 window 1 (mean 20); each enters the EMA at the first step of the next
    assert history[0] == pytest.approx((1.0, 0.0))
    assert history[2] == pytest.approx((2.0, 0.0))
    assert history[3] == pytest.approx((10.0, 0.15 * 2.0))
    assert history[5][0] == pytest.approx(20.0)
    assert history[6] == pytest.approx((5.0, 0.85 * 0.3 + 0.15 * 20.0))


def test_uncertainty_term_multiplies_the_score():
    values = [torch.tensor([[1.0, 4.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]])]
    state = new_state(values[0], beta2=0.5)
    for step, value in enumerate(values):
        update_scores(state, value, step, delta_t=2, beta1=0.5, beta2=0.5)
    # window 0 = [2, 4]; at step 2: ema = 0.5 * window = [1, 2]; unc = 0.5 * |window - ema| = [0.5, 1]
    torch.testing.assert_close(state["ema"], torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(state["unc"], torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(row_scores(state), torch.tensor([(0.5 + 2.0) / 2]))


def test_row_mean_of_elementwise_scores_equals_rowwise_tracking():
    torch.manual_seed(0)
    steps = [(torch.randn(4, 6), torch.randn(4, 6)) for _ in range(7)]
    elem, row = new_state(torch.zeros(4, 6), 1.0), new_state(torch.zeros(4), 1.0)
    for step, (w, g) in enumerate(steps):
        update_scores(elem, sensitivity(w, g, per_row=False), step, 2, 0.85, 1.0)
        update_scores(row, sensitivity(w, g, per_row=True), step, 2, 0.85, 1.0)
    torch.testing.assert_close(row_scores(elem), row_scores(row))


def _kthvalue_mask(scores, sizes, ratio):
    """The reference's rule on per-weight scores: k-th smallest of all weights, prune those strictly below."""
    all_is = torch.cat([s.repeat_interleave(n) for s, n in zip(scores, sizes, strict=True)])
    threshold = torch.kthvalue(all_is, int(all_is.shape[0] * (1 - ratio)))[0].item()
    return [s >= threshold for s in scores], threshold


@pytest.mark.parametrize("ratio", [0.9, 0.5, 0.33, 0.1])
def test_one_global_threshold_as_the_reference_draws_it(ratio):
    torch.manual_seed(0)
    scores = [torch.rand(8), torch.rand(16) * 2, torch.rand(4) * 0.1]
    sizes = [10, 5, 40]
    keeps, threshold = select_rows(scores, sizes, ratio)
    expected, expected_threshold = _kthvalue_mask(scores, sizes, ratio)
    assert threshold == expected_threshold
    for k, e in zip(keeps, expected, strict=True):
        assert torch.equal(k, e)
    total = sum(s.numel() * n for s, n in zip(scores, sizes, strict=True))
    kept = sum(int(k.sum()) * n for k, n in zip(keeps, sizes, strict=True))
    assert ratio * total - 1 <= kept < ratio * total + max(sizes)  # at least the target, within one row
    assert int(keeps[1].sum()) > int(keeps[2].sum())  # layers are not pruned uniformly


def test_nothing_pruned_when_the_target_is_below_one_weight():
    keeps, threshold = select_rows([torch.tensor([1.0, 2.0])], [3], 0.9)
    assert keeps[0].all() and threshold == float("-inf")


def test_every_row_is_re_decided():
    # a row zeroed before (its weights are 0) is ranked by its current score like any other: regrowth
    # k = int(4 * 0.5) = 2: the threshold is the 2nd smallest score, 3.0, and only scores below it are pruned
    keeps, threshold = select_rows([torch.tensor([5.0, 2.0, 4.0, 3.0])], [1], 0.5)
    assert keeps[0].tolist() == [True, False, True, True] and threshold == 3.0
