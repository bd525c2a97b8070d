import pytest
import torch

from optimum_oats.algorithms.owl import outlier_ratios, owl_block_rates


def test_outlier_ratio_pools_all_layers_of_the_block():
    q = torch.ones(4, 5)  # 20 scores of 1
    down = torch.ones(2, 10)
    down[0, :3] = 100.0  # 3 outliers among 40 scores: mean = (37 + 300) / 40 = 8.425
    ratio = outlier_ratios([q, down], threshold_m=5)
    assert ratio.dtype == torch.float64 and ratio.dim() == 0
    assert float(ratio) == pytest.approx(100 * 3 / 40)
    # per-layer ratios would differ: pooling uses the block's mean, not each layer's
    assert float(outlier_ratios([down], threshold_m=5)) == pytest.approx(100 * 3 / 20)


def test_outlier_ratio_matches_the_concatenated_definition():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(8, 16, generator=g) ** 4, torch.rand(32, 8, generator=g) ** 4]
    flat = torch.cat([s.flatten() for s in scores])
    expected = 100 * float((flat > flat.mean() * 3).sum()) / flat.numel()
    assert float(outlier_ratios(scores, threshold_m=3)) == pytest.approx(expected)


@pytest.mark.parametrize("bad,match", [([], "empty"), ([torch.ones(0)], "no entries")])
def test_outlier_ratio_rejects_empty(bad, match):
    with pytest.raises(ValueError, match=match):
        outlier_ratios(bad, threshold_m=5)


def test_outlier_ratio_rejects_non_positive_m():
    with pytest.raises(ValueError, match="threshold_m"):
        outlier_ratios([torch.ones(3)], threshold_m=0)


@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.2), (0.3, 0.02)])
def test_rates_mean_spread_and_order(target, lam):
    D = torch.tensor([1.3, 4.0, 0.2, 2.7, 9.1, 0.9], dtype=torch.float64)
    rates = torch.tensor(owl_block_rates(D, target, lam), dtype=torch.float64)
    assert abs(float(rates.mean()) - target) < 1e-9
    assert abs(float(rates.max() - rates.min()) - 2 * lam) < 1e-9
    # higher outlier ratio -> lower sparsity
    assert torch.equal(torch.argsort(rates), torch.argsort(D, descending=True))


def test_rates_follow_the_formula():
    D = torch.tensor([2.0, 6.0, 4.0])
    # D' = 2λ (D - 2) / 4 = [0, 0.2, 0.1]; density = D' - 0.1 + 0.5; rate = 1 - density
    assert owl_block_rates(D, 0.5, 0.1) == pytest.approx([0.6, 0.4, 0.5], abs=1e-12)
    assert owl_block_rates([2.0, 6.0, 4.0], 0.5, 0.1) == pytest.approx([0.6, 0.4, 0.5], abs=1e-12)


def test_equal_ratios_give_uniform_rates():
    assert owl_block_rates(torch.full((5,), 3.0), 0.6, 0.08) == pytest.approx([0.6] * 5, abs=1e-12)
    assert owl_block_rates(torch.tensor([7.0]), 0.6, 0.08) == pytest.approx([0.6], abs=1e-12)


@pytest.mark.parametrize("target,lam", [(0.9, 0.2), (0.05, 0.1)])
def test_rate_outside_unit_interval_is_an_error(target, lam):
    with pytest.raises(ValueError, match=rf"leave \(0, 1\) with `lam`={lam} and `target_rate`={target}"):
        owl_block_rates(torch.tensor([0.0, 1.0, 5.0]), target, lam)


@pytest.mark.parametrize(
    "D,target,lam,match",
    [
        (torch.tensor([1.0, 2.0]), 1.0, 0.08, "target_rate"),
        (torch.tensor([1.0, 2.0]), 0.0, 0.08, "target_rate"),
        (torch.tensor([1.0, 2.0]), 0.5, -0.1, "lam"),
        (torch.tensor([]), 0.5, 0.08, "non-empty 1-D"),
        (torch.ones(2, 2), 0.5, 0.08, "non-empty 1-D"),
        (torch.tensor([1.0, float("nan")]), 0.5, 0.08, "finite"),
    ],
)
def test_invalid_arguments(D, target, lam, match):
    with pytest.raises(ValueError, match=match):
        owl_block_rates(D, target, lam)
