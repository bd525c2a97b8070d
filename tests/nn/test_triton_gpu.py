"""The compiled Triton kernels on a real GPU (marked `gpu`; skipped without CUDA). The CPU runs the same kernels
through the interpreter in test_triton_kernels.py; this checks the compiled code paths (bf16/fp16 `tl.dot`,
autotuned configurations) that the interpreter cannot."""

import pytest
import torch

from optimum_oats.kernels import gpu
from optimum_oats.nn import LinearSparseLowRank, choose_mode, pack_bitmask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _layer(d_out, d_in, rank, dtype, nm=False):
    generator = torch.Generator(device="cuda").manual_seed(d_out + d_in)
    if nm:
        mask = torch.zeros(d_out, d_in // 4, 4, dtype=torch.bool, device="cuda")
        mask.scatter_(2, torch.rand(d_out, d_in // 4, 4, device="cuda", generator=generator).topk(2, 2).indices, True)
        mask = mask.view(d_out, d_in)
    else:
        mask = torch.rand(d_out, d_in, device="cuda", generator=generator) < torch.rand(d_out, 1, device="cuda")
    layer = LinearSparseLowRank(d_in, d_out, rank=rank, nnz=int(mask.sum()), bias=True, device="cuda", dtype=dtype)
    with torch.no_grad():
        layer.weight_mask.copy_(pack_bitmask(mask))
        for tensor in (layer.weight, layer.lowrank_u, layer.lowrank_v, layer.bias):
            tensor.normal_(0, 0.1, generator=generator)
    return layer.requires_grad_(False)


def _offsets(layer):
    counts = layer.dense_mask().sum(dim=1)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(256, 512, 16), (301, 777, 0), (1024, 4096, 102)])
@pytest.mark.parametrize("tokens", [1, 4, 16, 100])
def test_compiled_matches_reference(dtype, d_out, d_in, rank, tokens):
    layer = _layer(d_out, d_in, rank, dtype)
    x = torch.randn(tokens, d_in, device="cuda", dtype=dtype)
    assert gpu.triton_available(x)
    with torch.no_grad():
        out = gpu.layer_forward(layer, x, _offsets(layer))
    expected = x.double() @ layer.to_dense().double().T + layer.bias.double()
    error = (out.double() - expected).norm() / expected.norm()
    assert error < (1e-4 if dtype == torch.float32 else 2e-2)


def test_two_four_prefill():
    layer = _layer(512, 1024, 8, torch.bfloat16, nm=True)
    assert gpu.layer_two_four(layer)
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = gpu.layer_forward(layer, x, _offsets(layer))
    expected = x.double() @ layer.to_dense().double().T + layer.bias.double()
    assert (out.double() - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("mode", ["auto", "sparse_kernel"])
def test_dispatch_runs_triton_on_cuda(monkeypatch, mode, tokens):
    # The library's dispatch, not a direct call: a CUDA call in the layer's dtype must reach gpu.layer_forward.
    layer = _layer(256, 512, 16, torch.bfloat16)
    layer.set_execution_mode(mode)
    calls = []
    original = gpu.layer_forward
    monkeypatch.setattr(gpu, "layer_forward", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        assert choose_mode(layer, x) == "sparse_kernel"
    assert calls == [1]
    expected = x.double() @ layer.to_dense().double().T + layer.bias.double()
    assert (out.double() - expected).norm() / expected.norm() < 2e-2
