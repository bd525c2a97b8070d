"""Quantization inside the algorithms: on-grid results; OBS compensation beats round-to-nearest after the fact."""

from types import SimpleNamespace

import pytest
import torch

from optimum_oats.algorithms import ALGORITHMS, GroupSpec, compress_layer, layer_budget, resolve_method_settings
from optimum_oats.algorithms.hessian_slr import (
    hessian_objective,
    hessian_sparse_low_rank,
    quantized_hessian_sparse_low_rank,
)
from optimum_oats.algorithms.quantize import codes_of, expand_scales, quantize_rtn, round_to_grid
from optimum_oats.algorithms.sparsegpt import sparsegpt_prune, sparsegpt_prune_quantized


def _layer(d_out=48, d_in=256, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, 8, generator=g) @ torch.randn(8, d_in, generator=g)
    X = X + 0.5 * torch.randn(tokens, d_in, generator=g)
    X[:, :3] *= 10
    W = torch.randn(d_out, d_in, generator=g)
    H = (2 * X.double().T @ X.double() / tokens).float()
    return W, H, X


def _on_grid(values, scales, spec):
    return torch.equal(round_to_grid(values, expand_scales(scales, values.shape[1], spec), spec), values)


def _error(W, approx, H):
    return hessian_objective(W - approx, H)


@pytest.mark.parametrize("bits", [3, 4])
def test_sparsegpt_quantizes_jointly_better_than_rtn_after(bits):
    W, H, _ = _layer()
    spec = GroupSpec(bits, 64)
    joint, scales = sparsegpt_prune_quantized(W, H, spec, sparsity=0.4)
    assert _on_grid(joint, scales, spec) and scales.shape == (48, 4)
    pruned = sparsegpt_prune(W, H, sparsity=0.4)
    # the same mask rule (later blocks' masks see the earlier rounding, so only the first block's is identical)
    assert torch.equal(joint[:, :128] != 0, pruned[:, :128] != 0) and (joint != 0).sum() == (pruned != 0).sum()
    rtn, _ = quantize_rtn(pruned, spec)
    assert _error(W, joint, H) < 0.9 * _error(W, rtn, H)  # the compensation lowers the output error


def test_group_wider_than_the_block_widens_the_block():
    W, H, _ = _layer(d_in=512)
    joint, scales = sparsegpt_prune_quantized(W, H, GroupSpec(4, 256), sparsity=0.5)
    assert scales.shape == (48, 2) and _on_grid(joint, scales, GroupSpec(4, 256))


@pytest.mark.parametrize("bits", [3, 4])
def test_hassle_quantized_is_on_grid_and_beats_rtn_after(bits):
    W, H, _ = _layer()
    values, factors = GroupSpec(bits, 64), GroupSpec(8, 64, zero_level=True)
    common = {"rank": 6, "sparsity": 0.5, "iterations": 2}
    quantized = quantized_hessian_sparse_low_rank(W, H, values, factors, **common)
    assert _on_grid(quantized.sparse, quantized.value_scales, values)
    assert _on_grid(quantized.lowrank_u, quantized.lowrank_u_scales, factors)
    assert _on_grid(quantized.lowrank_v, quantized.lowrank_v_scales, factors)
    assert quantized.history == sorted(quantized.history, reverse=True)
    plain = hessian_sparse_low_rank(W, H, **common)
    s_rtn, _ = quantize_rtn(plain.sparse, values)
    u_rtn, _ = quantize_rtn(plain.lowrank_u, factors)
    v_rtn, _ = quantize_rtn(plain.lowrank_v, factors)
    ours = _error(W, quantized.sparse + quantized.lowrank_u @ quantized.lowrank_v, H)
    after = _error(W, s_rtn + u_rtn @ v_rtn, H)
    assert ours < 0.9 * after


@pytest.mark.parametrize("method", ["oats", "wanda", "magnitude", "sparsegpt", "hassle"])
def test_every_method_returns_values_and_factors_on_their_grids(method):
    W, H, X = _layer(d_out=32, d_in=128)
    own = {"oats": {"num_iterations": 5}, "hassle": {"num_iterations": 5, "hessian_iterations": 1}}.get(method, {})
    settings = SimpleNamespace(
        method_settings=resolve_method_settings(method, own), value_bits=4, group_size=64, lowrank_bits=8
    )
    algorithm = ALGORITHMS[method]
    budget = layer_budget(32, 128, 0.5, 0.1 if algorithm.uses_low_rank else 0.0)
    stats = {"hessian": H, "input_norms": X.norm(dim=0)}
    result = compress_layer(algorithm, W, stats, budget, settings)
    values = GroupSpec(4, 64)
    assert _on_grid(result.sparse, result.value_scales, values)
    codes = codes_of(result.sparse, result.value_scales, values)
    assert int(codes.max()) <= 15
    if algorithm.uses_low_rank:
        factors = GroupSpec(8, 64, zero_level=True)
        assert _on_grid(result.lowrank_u, result.lowrank_u_scales, factors)
        assert _on_grid(result.lowrank_v, result.lowrank_v_scales, factors)
    assert algorithm.quantizes_jointly == (method in ("sparsegpt", "hassle"))
