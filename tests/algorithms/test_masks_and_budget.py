import math

import pytest
import torch

from optimum_oats.algorithms import layer_budget, nm_mask, rowwise_topk_mask


def test_rowwise_topk_keeps_exactly_k_largest_per_row():
    scores = torch.rand(7, 33, generator=torch.Generator().manual_seed(0))
    mask = rowwise_topk_mask(scores, 10)
    assert (mask.sum(1) == 10).all()
    kept_min = torch.where(mask, scores, torch.inf).min(1).values
    dropped_max = torch.where(mask, -torch.inf, scores).max(1).values
    assert (kept_min > dropped_max).all()


def test_rowwise_topk_rejects_out_of_range():
    with pytest.raises(ValueError, match="keep_per_row"):
        rowwise_topk_mask(torch.rand(2, 4), 5)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (2, 8)])
def test_nm_mask_groups(n, m):
    scores = torch.rand(5, 32, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(scores, n, m)
    assert (mask.view(5, -1, m).sum(-1) == n).all()


def test_nm_mask_needs_divisible_width():
    with pytest.raises(ValueError, match="divisible by M=4"):
        nm_mask(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536), (64, 64), (100, 37)])
@pytest.mark.parametrize("rho", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("kappa", [0.0, 0.25, 0.3])
def test_budget_within_one_percent_and_never_above(shape, rho, kappa):
    d_out, d_in = shape
    budget = layer_budget(d_out, d_in, rho, kappa)
    target = (1 - rho) * d_out * d_in
    counted = budget.num_parameters(d_out, d_in)
    assert counted <= target + 1e-6
    assert target - counted < d_out  # row-wise rounding loses less than one weight per row
    if d_in >= 100:
        assert counted >= 0.99 * target
    assert budget.rank == math.floor(kappa * target / (d_out + d_in))


def test_budget_nm_keeps_n_over_m_and_low_rank_share():
    budget = layer_budget(576, 1536, 0.5, 0.25, nm=(2, 8))
    assert budget.keep_per_row == 1536 * 2 // 8
    low_rank = budget.rank * (576 + 1536)
    total = budget.num_parameters(576, 1536)
    assert abs(low_rank / total - 0.25) < 0.01
