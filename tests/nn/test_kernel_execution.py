"""The compiled "sparse_kernel" mode, the "auto" mode and the fallback when the extension is unavailable.

The extension is compiled once per machine into the kernel cache (`OATS_KERNEL_CACHE`); later runs only load it.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from optimum_oats.kernels import DISABLE_ENV, kernel_available, load_kernel
from optimum_oats.nn import LinearSparseLowRank, choose_mode, set_execution_mode
from optimum_oats.nn.kernel_execution import (
    AUTO_MAX_KERNEL_TOKENS,
    fold_low_rank,
    release_workspaces,
    row_offsets,
    workspace,
)

TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def _layer(out_features, in_features, rank, bias=True, dtype=torch.float32, density=0.4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    sparse = linear.weight.detach() * (torch.rand(out_features, in_features, generator=generator) < density)
    u = torch.randn(out_features, rank, generator=generator) if rank else None
    v = torch.randn(rank, in_features, generator=generator) if rank else None
    return LinearSparseLowRank.from_linear(linear.to(dtype), sparse, u, v)


def _compare(layer, x):
    """Kernel output vs the decompress path on the same layer, both without autograd."""
    with torch.no_grad():
        layer.set_execution_mode("decompress")
        expected = layer(x)
        layer.set_execution_mode("sparse_kernel")
        out = layer(x)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    # bf16 outputs are rounded to bf16 once: compare relative to the output scale.
    scale = expected.float().abs().max().clamp_min(1.0)
    torch.testing.assert_close(out.float() / scale, expected.float() / scale, **TOLERANCE[x.dtype])


def test_kernel_builds_here():
    # The CI/dev machine has g++ and ninja: the compiled path must really be exercised, not silently skipped.
    assert kernel_available()
    assert hasattr(load_kernel(), "sparse_lowrank_forward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("out_features", "in_features", "rank"),
    [(37, 53, 5), (64, 96, 0), (3, 1, 1), (40, 33, 7), (17, 200, 3), (48, 48, 48)],
)
@pytest.mark.parametrize("tokens", [1, 3, 7, 29])
def test_kernel_matches_decompress(dtype, out_features, in_features, rank, tokens):
    layer = _layer(out_features, in_features, rank, dtype=dtype, seed=out_features + in_features)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    _compare(layer, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_3d_input_no_bias_and_density_extremes(dtype):
    x = torch.randn(2, 5, 70).to(dtype)
    for density in (0.0, 1.0, 0.375):
        _compare(_layer(19, 70, 4, bias=False, dtype=dtype, density=density), x)
    _compare(_layer(19, 70, 0, bias=False, dtype=dtype), x[:, :1])


def test_kernel_on_a_smollm2_shape():
    # A real layer shape (576 x 1536 down projection) through both the decode and the many-token paths.
    layer = _layer(576, 1536, 52, density=0.375)
    for tokens in (1, 9):
        _compare(layer, torch.randn(tokens, 1536))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_splits_rows_across_threads(dtype):
    # Row tiles and the rank rows of V are split across threads by at::parallel_for: same result as one thread.
    layer = _layer(203, 75, 40, dtype=dtype)
    x = torch.randn(6, 75).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _compare(layer, x)
        _compare(layer, x[:1])
    finally:
        torch.set_num_threads(before)


def test_row_offsets_follow_mask_changes():
    layer = _layer(8, 20, 2)
    first = row_offsets(layer)
    assert first[-1] == layer.sparse_nnz and torch.equal(row_offsets(layer), first)
    sparse = torch.zeros(8 * 20)
    sparse[: layer.sparse_nnz] = 1.0  # same nnz, packed into the first rows
    sparse = sparse.view(8, 20)
    layer.load_decomposition(sparse, layer.lowrank_u.detach(), layer.lowrank_v.detach())
    assert not torch.equal(row_offsets(layer), first)
    _compare(layer, torch.randn(3, 20))


def test_inconsistent_storage_is_refused():
    layer = _layer(4, 16, 1)
    with torch.no_grad():
        layer.weight_mask.fill_(255)  # marks every weight but `weight` holds fewer values
    with pytest.raises(ValueError, match="weight_mask"):
        row_offsets(layer)


def test_gradients_use_the_differentiable_path():
    layer = _layer(12, 16, 2)
    layer.set_execution_mode("sparse_kernel")
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None and layer.lowrank_v.grad is not None
    assert choose_mode(layer, x) == "decompress"


def test_auto_chooses_by_tokens_and_matches():
    layer = _layer(24, 40, 3)
    assert layer.execution_mode == "auto"
    small, large = torch.randn(2, 40), torch.randn(AUTO_MAX_KERNEL_TOKENS[torch.float32] + 1, 40)
    with torch.no_grad():
        assert choose_mode(layer, small) == "sparse_kernel"
        assert choose_mode(layer, large) == "workspace"  # prefill: no dense copy left behind
        assert choose_mode(layer, small.double()) == "decompress"  # dtype the kernel does not handle
        outputs = [layer(small), layer(large)]
        layer.set_execution_mode("decompress")
        torch.testing.assert_close(outputs[0], layer(small), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outputs[1], layer(large), rtol=1e-5, atol=1e-5)
        assert layer._merged_cache is None
    with torch.enable_grad():
        assert choose_mode(layer, small) == "decompress"  # trainable parameters: keep autograd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_prompts_fold_the_low_rank_term_into_the_workspace(dtype):
    """From d_out d_in / (d_out + d_in) tokens on (15 for 24x40), `U V` goes into the workspace, one GEMM follows."""
    layer = _layer(24, 40, 3, dtype=dtype)
    assert not fold_low_rank(layer, 15) and fold_low_rank(layer, 16)
    assert not fold_low_rank(_layer(24, 40, 0), 10_000)  # no low-rank term: nothing to fold
    reference = layer.to_dense().float()
    release_workspaces()
    layer.set_execution_mode("workspace")
    with torch.no_grad():
        for tokens, folded in ((15, False), (16, True), (64, True)):
            x = torch.randn(tokens, 40).to(dtype)
            expected = x.float() @ reference.T + layer.bias.float()
            tol = 1e-4 if dtype == torch.float32 else 0.1
            torch.testing.assert_close(layer(x).float(), expected, rtol=tol, atol=tol * 10)
            buffer = workspace(24, 40, dtype, torch.device("cpu"))
            holds = reference if folded else layer.sparse_weight().float()
            torch.testing.assert_close(buffer.float(), holds, rtol=1e-2, atol=1e-2)
    release_workspaces()


def test_set_execution_mode_on_a_model():
    model = nn.Sequential(_layer(8, 8, 1), nn.ReLU(), _layer(4, 8, 1))
    assert set_execution_mode(model, "sparse_kernel") == 2
    assert {m.execution_mode for m in model if isinstance(m, LinearSparseLowRank)} == {"sparse_kernel"}
    with pytest.raises(ValueError, match="mode"):
        set_execution_mode(model, "fastest")


def test_disabled_extension_falls_back(monkeypatch):
    layer = _layer(10, 30, 2)
    x = torch.randn(4, 30)
    with torch.no_grad():
        layer.set_execution_mode("sparse_kernel")
        compiled = layer(x)
        monkeypatch.setenv(DISABLE_ENV, "1")
        assert load_kernel() is None and not kernel_available()
        assert choose_mode(layer, x) == "decompress"
        torch.testing.assert_close(layer(x), compiled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", ["0", "", "false", "No"])
def test_disable_switch_off_values_keep_the_kernel(monkeypatch, value):
    monkeypatch.setenv(DISABLE_ENV, value)
    assert load_kernel() is not None


def test_kernel_reads_storage_a_wrapper_moved_out_of_the_module_dicts():
    # The decode path reads the tensors from `_parameters`/`_buffers` (fast); a layer whose bias was replaced by a
    # plain attribute still gets the right answer through the attribute fallback.
    layer = _layer(12, 40, 3)
    x = torch.randn(2, 40)
    with torch.no_grad():
        layer.set_execution_mode("sparse_kernel")
        expected = layer(x)
        bias = layer.bias.detach().clone()
        del layer.bias
        layer.__dict__["bias"] = bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        layer.__dict__["bias"] = bias + 1
        torch.testing.assert_close(layer(x), expected + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_failed_build_warns_once_and_falls_back(tmp_path):
    # A fresh process whose compiler is missing: the build really fails, a warning is shown once, results stay right.
    script = textwrap.dedent(
        """
        import warnings, torch
        from optimum_oats.nn import LinearSparseLowRank
        from optimum_oats.kernels import kernel_available
        layer = LinearSparseLowRank(9, 6, rank=1, nnz=0)
        layer.set_execution_mode("sparse_kernel")
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = [layer(torch.ones(2, 9)) for _ in range(3)]
        assert not kernel_available()
        assert sum("could not build its CPU kernel" in str(w.message) for w in caught) == 1, caught
        assert torch.equal(out[0], layer.bias.detach().expand(2, 6))
        print("fallback-ok")
        """
    )
    env = {
        "PATH": "/nonexistent",  # no c++/ninja
        "CXX": "/nonexistent/c++",
        "OATS_KERNEL_CACHE": str(tmp_path),  # nothing prebuilt to load
        "OMP_NUM_THREADS": "1",
        "HOME": str(tmp_path),
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fallback-ok" in result.stdout
