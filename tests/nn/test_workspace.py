"""Prefill through a shared workspace: the same outputs as the reference, one buffer per shape, no dense copy kept."""

from __future__ import annotations

import pytest
import torch

from optimum_oats.kernels import DISABLE_ENV
from optimum_oats.kernels.workspaces import workspaces
from optimum_oats.nn import LinearSparseLowRank
from optimum_oats.nn.kernel_execution import release_workspaces, workspace_forward


def _layer(out_features, in_features, rank, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    keep = torch.rand(out_features, in_features) < torch.linspace(0.02, 0.98, out_features)[:, None]  # uneven rows
    sparse = linear.weight.detach() * keep
    u, v = (torch.randn(out_features, rank) * 0.1, torch.randn(rank, in_features) * 0.1) if rank else (None, None)
    return LinearSparseLowRank.from_linear(linear, sparse, u, v).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features", "rank", "bias"), [(24, 40, 3, True), (13, 37, 0, False)])
@pytest.mark.parametrize("disabled", [False, True])
def test_workspace_matches_the_reference(dtype, out_features, in_features, rank, bias, disabled, monkeypatch):
    if disabled:
        monkeypatch.setenv(DISABLE_ENV, "1")  # the PyTorch fallback fills the workspace
    layer = _layer(out_features, in_features, rank, dtype, bias)
    x = torch.randn(2, 33, in_features).to(dtype)
    with torch.no_grad():
        expected = x.float() @ layer.to_dense().float().T + (layer.bias.float() if bias else 0)
        got = workspace_forward(layer, x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    assert got.dtype == dtype and got.shape == (2, 33, out_features)


def test_layers_of_one_shape_share_one_buffer_and_keep_no_dense_copy():
    release_workspaces()
    layers = [_layer(16, 24, 2, seed=s) for s in range(3)] + [_layer(8, 24, 1)]
    x = torch.randn(40, 24)
    with torch.no_grad():
        outputs = [layer(x) for layer in layers]  # "auto" sends 40 tokens to the workspace
    assert sorted(key[2:] for key in workspaces()) == [(8, 24), (16, 24)]
    assert all(layer._merged_cache is None for layer in layers)
    for layer, out in zip(layers, outputs, strict=True):  # a later layer's decompression did not disturb it
        layer.set_execution_mode("decompress")
        with torch.no_grad():
            torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    release_workspaces()
    assert not workspaces()


def test_workspace_keeps_autograd():
    layer = _layer(8, 12, 2)
    layer.set_execution_mode("workspace")
    x = torch.randn(20, 12, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
