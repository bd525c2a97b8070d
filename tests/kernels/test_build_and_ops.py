"""The compiled kernels: built ahead of time by a command, cached per environment, quiet when cached, a clean
fallback without a compiler, and the layer forward as a `torch.library` op that `torch.compile` traces."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from optimum_oats.kernels import build_kernels, build_location, load_kernel
from optimum_oats.nn import LinearSparseLowRank
from tests.helpers.compressed import quantized_layer


def _layer(rank: int = 3) -> LinearSparseLowRank:
    torch.manual_seed(0)
    linear = torch.nn.Linear(37, 21)
    sparse = linear.weight.detach() * (torch.rand(21, 37) < torch.linspace(0.1, 0.9, 21)[:, None])  # uneven rows
    u, v = (torch.randn(21, rank), torch.randn(rank, 37)) if rank else (None, None)
    return LinearSparseLowRank.from_linear(linear, sparse, u, v).eval()


def _op_args(layer, x, mode="sparse_kernel"):
    """The op's inputs, detached: it is an inference kernel (autograd goes through the PyTorch path)."""
    storage = (t.detach() if isinstance(t, torch.Tensor) else t for t in layer.packed())
    return (x.detach(), *storage, mode)


@pytest.fixture(scope="module")
def kernel():
    build_kernels()  # what scripts/setup.sh runs; a no-op when the cache holds the build
    return load_kernel()


@pytest.mark.parametrize("mode", ["sparse_kernel", "workspace", "auto"])
@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
def test_custom_op_matches_the_dense_product_and_passes_opcheck(kernel, rank, mode, quantized):
    layer = quantized_layer(21, 37, value_bits=4, group_size=8, rank=rank) if quantized else _layer(rank)
    x = torch.randn(2, 37)
    with torch.no_grad():
        y = torch.ops.optimum_oats.sparse_lowrank_linear(*_op_args(layer, x, mode))
        torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.optimum_oats.sparse_lowrank_linear.default, _op_args(layer, x, mode))


def test_the_default_implementation_is_decompress_and_matmul(kernel):
    # A device without its own implementation (here: the op's Python body, what `meta`-less backends run).
    from optimum_oats.kernels.ops import sparse_lowrank_linear

    layer = _layer()
    x = torch.randn(3, 37)
    with torch.no_grad():
        y = sparse_lowrank_linear._init_fn(*_op_args(layer, x, "auto"))
    torch.testing.assert_close(y, x @ layer.to_dense().T + layer.bias, rtol=1e-5, atol=1e-5)


def test_torch_compile_traces_the_op_without_a_graph_break(kernel):
    layer = _layer()
    args = _op_args(layer, torch.randn(1, 37))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def forward(*inputs):
        return torch.ops.optimum_oats.sparse_lowrank_linear(*inputs) * 2

    with torch.no_grad():
        torch.testing.assert_close(forward(*args), 2 * torch.ops.optimum_oats.sparse_lowrank_linear(*args))


def test_cache_folder_depends_on_the_environment(monkeypatch):
    name, folder = build_location()
    monkeypatch.setattr(sys, "prefix", "/some/other/venv")
    other_name, other_folder = build_location()
    assert other_name != name and other_folder != folder


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )


@pytest.mark.slow
def test_loading_a_cached_build_logs_nothing(kernel):
    result = _python(
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from optimum_oats.kernels import load_kernel; assert load_kernel() is not None"
    )
    assert result.returncode == 0, result.stderr
    assert "Compiling" not in result.stderr


@pytest.mark.slow
def test_no_compiler_falls_back_with_a_warning_and_the_command_says_so(tmp_path):
    env = {"CXX": "/nonexistent/c++", "CC": "/nonexistent/cc", "OATS_KERNEL_CACHE": str(tmp_path)}
    result = _python(
        "import warnings, torch\n"
        "from optimum_oats.nn import LinearSparseLowRank\n"
        "from optimum_oats.kernels import load_kernel\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert load_kernel() is None\n"
        "print('|'.join(str(w.message) for w in caught))\n"
        "layer = LinearSparseLowRank.from_linear(torch.nn.Linear(8, 4), torch.eye(4, 8))\n"
        "print(layer(torch.ones(1, 8)).shape)\n",
        **env,
    )
    assert result.returncode == 0, result.stderr
    assert "could not build its CPU kernel" in result.stdout and "fall back" in result.stdout
    assert "torch.Size([1, 4])" in result.stdout
    command = subprocess.run(
        [sys.executable, "-m", "optimum.commands.register.oats", "build-kernels"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )
    assert command.returncode == 1
    assert '"ok": false' in command.stdout and "could not be built" in command.stdout


def _cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def test_the_build_uses_the_vector_path_this_cpu_has(kernel):
    """So the kernel-vs-reference tests of tests/nn exercise the AVX2 (or AVX-512) path, not the portable one."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_bf16"} <= flags:
        assert kernel.isa() == "avx512"
    elif {"avx2", "fma"} <= flags:
        assert kernel.isa() == "avx2"
    else:
        assert kernel.isa() == "portable"


def test_auto_never_picks_the_portable_kernel(kernel, monkeypatch):
    from optimum_oats.kernels import dispatch
    from optimum_oats.nn import kernel_execution

    layer = _layer()
    x = torch.randn(1, 37)
    with torch.no_grad():
        assert kernel_execution.choose_mode(layer, x) == "sparse_kernel"
        monkeypatch.setattr(dispatch, "_VECTOR_ISA", {id(kernel): False})
        assert kernel_execution.choose_mode(layer, x) == "decompress"
