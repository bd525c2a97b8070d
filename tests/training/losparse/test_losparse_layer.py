import math

import pytest
import torch
from torch import nn

from optimum_oats.training.losparse import LoSparseConfig, LoSparseLinear, apply_losparse, losparse_rank


def test_rank_formula():
    assert losparse_rank(64, 128, 0.05) == math.ceil(0.05 * 64 * 128 / 192)
    assert losparse_rank(4, 4, 0.99) == 2  # ceil(1.98)
    assert losparse_rank(4, 6, 1.0) == 3  # ceil(2.4)


def test_init_from_svd_reproduces_the_linear_and_splits_sqrt_sigma():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    layer = LoSparseLinear.from_linear(linear, rank=5)
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    sigma = torch.linalg.svdvals(linear.weight.detach())[:5]
    # √Σ in both factors: column norms of U equal row norms of V equal √σ
    torch.testing.assert_close(layer.lowrank_u.norm(dim=0), sigma.sqrt(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lowrank_v.norm(dim=1), sigma.sqrt(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lowrank_u @ layer.lowrank_v + layer.weight, linear.weight, rtol=1e-5, atol=1e-6)


def test_pruned_rows_are_zero_but_still_get_gradients_so_they_can_regrow():
    torch.manual_seed(0)
    layer = LoSparseLinear.from_linear(nn.Linear(8, 6), rank=2)
    keep = torch.tensor([True, False, True, True, False, True])
    layer.set_row_mask(keep)
    assert (layer.weight[~keep] == 0).all() and (layer.weight[keep] != 0).all()
    layer(torch.randn(4, 8)).pow(2).sum().backward()
    assert (layer.weight.grad[~keep] != 0).any()  # as in the reference: the forward pass does not mask
    compact = layer.to_compact()
    assert compact.sparse_nnz == 4 * 8 and compact.rank == 2
    x = torch.randn(2, 8)
    torch.testing.assert_close(compact(x), layer(x))


def test_apply_replaces_block_linears_and_keeps_logits(tiny_llama):
    ids = torch.tensor([[1, 5, 99, 300, 7]])
    expected = tiny_llama(ids).logits
    config = LoSparseConfig(low_rank_ratio=0.1, modules_to_not_convert=["layers.1.mlp.down_proj"])
    ranks = apply_losparse(tiny_llama, config)
    assert len(ranks) == 2 * 7 - 1 and "model.layers.1.mlp.down_proj" not in ranks
    assert isinstance(tiny_llama.get_submodule("lm_head"), nn.Linear)
    torch.testing.assert_close(tiny_llama(ids).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="called once"):
        apply_losparse(tiny_llama, config)


def test_target_modules_select_by_suffix(tiny_llama):
    ranks = apply_losparse(tiny_llama, LoSparseConfig(target_modules=["q_proj", "layers.1.mlp.up_proj"]))
    assert sorted(ranks) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.q_proj",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"low_rank_ratio": 1.0}, "low_rank_ratio"),
        ({"final_remaining_ratio": 0.0}, "final_remaining_ratio"),
        ({"beta1": 1.0}, "beta1"),
        ({"delta_t": 0}, "delta_t"),
        ({"total_steps": 10, "initial_warmup_steps": 5, "final_warmup_steps": 5}, "no decay step"),
        ({"target_modules": "q_proj"}, "target_modules"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoSparseConfig(**kwargs)


def test_config_round_trip():
    config = LoSparseConfig(low_rank_ratio=0.1, target_modules=["q_proj"], total_steps=50)
    assert LoSparseConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown"):
        LoSparseConfig.from_dict({"rank": 3})


def test_losparse_is_not_a_one_shot_method(tiny_llama, tokenizer):
    from optimum_oats import OATSConfig, compress

    config = OATSConfig(method="losparse", dataset=["some text"] * 4, num_samples=1, seqlen=8)
    with pytest.raises(ValueError, match="training-time method"):
        compress(tiny_llama, config, tokenizer, progress=False)
