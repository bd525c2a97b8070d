"""Quantized values decoded on the fly: the C++ kernel and the prefill workspace read the packed codes and fp16
group scales as stored, keep no float copy, and agree with the one PyTorch decode formula on every code width, group
size, shape and token count (the vector build of this CPU; `test_kernel_builds.py` runs the other builds)."""

from __future__ import annotations

import itertools

import pytest
import torch

from optimum_oats.kernels import dispatch, load_kernel
from optimum_oats.nn import LinearSparseLowRank
from tests.helpers.compressed import quantized_layer

SHAPES = [(13, 77), (64, 576), (9, 128)]  # odd widths (a partial mask byte, a partial group), SmolLM2's width


@pytest.fixture(scope="module")
def kernel():
    kernel = load_kernel()
    assert kernel is not None, "the CPU kernel did not build"
    return kernel


def reference(layer: LinearSparseLowRank, x: torch.Tensor) -> torch.Tensor:
    """`x (S + U V)ᵀ + b` in float64 from the dense weight the PyTorch decode gives."""
    return (x.double() @ layer.to_dense().double().T + layer.bias.double()).float()


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [8, 64, 128])
def test_kernel_and_workspace_match_the_pytorch_decode(kernel, bits, group_size):
    torch.manual_seed(bits * 1000 + group_size)
    cases = itertools.product(SHAPES, [0, 5], [torch.float32, torch.bfloat16], [1, 4, 9])
    for (d_out, d_in), rank, dtype, tokens in cases:
        layer = quantized_layer(d_out, d_in, value_bits=bits, group_size=group_size, rank=rank, dtype=dtype)
        w = layer.packed()
        assert w.quantized and layer.weight.numel() == 0  # no float copy of the values
        x = torch.randn(2, tokens, d_in).to(dtype)
        expected = reference(layer, x)
        scale = expected.abs().max().item()  # bf16: its roundings of inputs, factors and output (<= ~1% measured)
        fp32 = dtype == torch.float32
        tolerance = {"rtol": 1e-4, "atol": 1e-5 * scale} if fp32 else {"rtol": 0, "atol": 2e-2 * scale}
        with torch.no_grad():
            for path in ("cpu_kernel", "workspace", "decompress"):
                got = dispatch.run_path(path, w, x, kernel if path == "cpu_kernel" else None)
                assert got.dtype == dtype and got.shape == (2, tokens, d_out)
                torch.testing.assert_close(got.float(), expected, **tolerance, msg=f"{path} {d_out}x{d_in} {dtype}")


def test_fp32_kernel_equals_the_float_kernel_on_the_decoded_values(kernel):
    """The decode is `(q - z) s` in fp32 exactly as the algorithms compute it: the same values stored as floats give
    the same products up to summation order."""
    layer = quantized_layer(64, 576, value_bits=4, rank=0)
    floats = LinearSparseLowRank.from_linear(layer.to_linear(), layer.sparse_weight()).eval()
    x = torch.randn(3, 576)
    with torch.no_grad():
        quantized = dispatch.run_path("cpu_kernel", layer.packed(), x, kernel)
        plain = dispatch.run_path("cpu_kernel", floats.packed(), x, kernel)
    torch.testing.assert_close(quantized, plain, rtol=1e-5, atol=1e-5)


def test_auto_mode_takes_the_kernel_for_decode_and_the_workspace_for_prefill(kernel):
    layer = quantized_layer(64, 576, value_bits=4)
    assert dispatch.choose_path(layer.packed(), torch.randn(1, 576)) == "cpu_kernel"
    assert dispatch.choose_path(layer.packed(), torch.randn(64, 576)) == "workspace"


def test_groups_that_split_a_mask_byte_take_the_pytorch_path(kernel):
    layer = quantized_layer(9, 40, value_bits=4, group_size=12)
    x = torch.randn(1, 40)
    assert dispatch.choose_path(layer.packed(), x, "sparse_kernel") == "decompress"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-4, atol=1e-4)


def test_damaged_codes_are_named(kernel):
    layer = quantized_layer(9, 128, value_bits=4)
    layer.weight_codes = layer.weight_codes[:-1].clone()  # one byte short
    with pytest.raises(ValueError, match="weight_codes"):
        layer(torch.randn(1, 128))
