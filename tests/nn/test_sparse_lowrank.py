import pytest
import torch
from torch import nn

from optimum_oats.nn import LinearSparseLowRank, pack_bitmask, unpack_bitmask


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 64, 100])
def test_bitmask_round_trip(cols):
    mask = torch.rand(5, cols, generator=torch.Generator().manual_seed(cols)) < 0.4
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (cols + 7) // 8)
    assert torch.equal(unpack_bitmask(packed, cols), mask)


def _layer(bias=True, rank=3, dtype=torch.float32):
    torch.manual_seed(0)
    linear = nn.Linear(24, 10, bias=bias).to(dtype)
    sparse = linear.weight.detach().float() * (torch.rand(10, 24) < 0.4)
    u, v = torch.randn(10, rank), torch.randn(rank, 24)
    return linear, sparse, u, v, LinearSparseLowRank.from_linear(linear, sparse, u, v)


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_weight(bias):
    linear, sparse, u, v, layer = _layer(bias)
    x = torch.randn(2, 5, 24)
    expected = x @ (sparse + u @ v).T + (linear.bias if bias else 0)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().T + (layer.bias if bias else 0))
    assert layer.rank == 3 and layer.sparse_nnz == int((sparse != 0).sum())
    assert layer.in_features == 24 and layer.out_features == 10


def test_storage_is_compact():
    *_, layer = _layer()
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes["weight"] == (layer.sparse_nnz,)
    assert shapes["weight_mask"] == (10, 3) and layer.weight_mask.dtype == torch.uint8
    assert not isinstance(layer, nn.Linear)


def test_merged_mode_matches_and_to_linear():
    _, _, _, _, layer = _layer()
    x = torch.randn(3, 24)
    reference = layer(x)
    layer.set_execution_mode("merged")
    torch.testing.assert_close(layer(x), reference)
    torch.testing.assert_close(layer.to_linear()(x), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        layer.set_execution_mode("nope")


def test_gradients_reach_values_and_factors():
    *_, layer = _layer()
    layer(torch.randn(4, 24)).sum().backward()
    assert layer.weight.grad is not None and layer.lowrank_u.grad is not None
    assert layer.lowrank_v.grad is not None


def test_bf16_forward():
    _, _, _, _, layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(2, 24, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = x.float() @ layer.to_dense().float().T + layer.bias.float()
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


def test_invalid_shapes():
    with pytest.raises(ValueError, match="nnz"):
        LinearSparseLowRank(4, 4, rank=1, nnz=17)
    with pytest.raises(ValueError, match="rank"):
        LinearSparseLowRank(4, 4, rank=5, nnz=3)
