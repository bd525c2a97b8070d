"""The CPU kernel's other builds on this machine: `-march=native` compiles only the vector path of the CPU it runs on
(AVX-512 on some machines, AVX2 on others), so the paths this CPU does not pick are compiled here with their own
flags (AVX-512 turned off; a portable x86-64 target) and checked against the PyTorch decode, float and quantized."""

from __future__ import annotations

import itertools
import platform
from importlib import resources

import pytest
import torch

from optimum_oats.kernels import SOURCES, dispatch, load_kernel
from optimum_oats.nn import LinearSparseLowRank
from tests.helpers.compressed import quantized_layer

pytestmark = pytest.mark.slow  # each build compiles the extension (about a minute)

BUILDS = {
    "avx2": ["-O3", "-march=native", "-mno-avx512f", "-fopenmp"],
    "portable": ["-O3", "-march=x86-64", "-fopenmp"],
}


def _cpu_flags() -> set[str]:
    for line in open("/proc/cpuinfo").read().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module", params=sorted(BUILDS))
def build(request, tmp_path_factory):
    """(expected `isa()`, the extension compiled with that build's flags into a fresh folder)."""
    if platform.machine() != "x86_64":
        pytest.skip("the AVX2 and portable builds are x86-64 code paths")
    isa = request.param
    if isa == "avx2" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX2 + FMA to run the AVX2 build on")
    from torch.utils.cpp_extension import load

    folder = resources.files("optimum_oats.kernels")
    sources = [str(folder.joinpath(name)) for name in SOURCES]
    module = load(
        name=f"oats_build_test_{isa}",
        sources=sources,
        extra_cflags=BUILDS[isa],
        extra_ldflags=["-fopenmp"],
        build_directory=str(tmp_path_factory.mktemp(f"kernel-{isa}")),
        verbose=False,
    )
    return isa, module


def _float_layer(d_out: int, d_in: int, rank: int, dtype: torch.dtype, seed: int) -> LinearSparseLowRank:
    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(d_in, d_out)
    keep = torch.rand(d_out, d_in, generator=generator) < torch.rand(d_out, 1, generator=generator)
    sparse = torch.randn(d_out, d_in, generator=generator) * keep
    u = torch.randn(d_out, rank, generator=generator) * 0.1 if rank else None
    v = torch.randn(rank, d_in, generator=generator) * 0.1 if rank else None
    return LinearSparseLowRank.from_linear(linear, sparse, u, v).to(dtype).eval()


def _check(layer: LinearSparseLowRank, kernel, tokens: int, label: str) -> None:
    x = torch.randn(2, tokens, layer.in_features).to(layer.weight_dtype)
    expected = (x.double() @ layer.to_dense().double().T + layer.bias.double()).float()
    scale = expected.abs().max().item()
    fp32 = layer.weight_dtype == torch.float32
    tolerance = {"rtol": 1e-4, "atol": 1e-5 * scale} if fp32 else {"rtol": 0, "atol": 2e-2 * scale}
    with torch.no_grad():
        got = dispatch.run_path("cpu_kernel", layer.packed(), x, kernel)
    assert got.dtype == x.dtype and got.shape == (2, tokens, layer.out_features)
    torch.testing.assert_close(got.float(), expected, **tolerance, msg=label)


def test_the_build_runs_its_own_path(build):
    isa, kernel = build
    assert kernel.isa() == isa
    assert load_kernel().isa() in ("avx512", "avx2", "portable")  # the default build is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_values_match_the_pytorch_decode(build, dtype):
    isa, kernel = build
    for (d_out, d_in), rank, tokens in itertools.product([(13, 77), (64, 576)], [0, 5], [1, 4, 9]):
        layer = _float_layer(d_out, d_in, rank, dtype, seed=d_out + rank + tokens)
        _check(layer, kernel, tokens, f"{isa} float {d_out}x{d_in} rank {rank} {dtype} tokens {tokens}")


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_values_match_the_pytorch_decode(build, bits, dtype):
    isa, kernel = build
    for (d_out, d_in), group, tokens in itertools.product([(13, 77), (64, 576)], [8, 128], [1, 4, 9]):
        layer = quantized_layer(d_out, d_in, value_bits=bits, group_size=group, dtype=dtype, seed=bits + group)
        _check(layer, kernel, tokens, f"{isa} {bits}-bit g{group} {d_out}x{d_in} {dtype} tokens {tokens}")
