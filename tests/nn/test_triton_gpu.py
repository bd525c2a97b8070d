"""The compiled Triton kernels on a real GPU (marked `gpu`; skipped without CUDA). The CPU runs the same kernels
through the interpreter in test_triton_kernels.py; this checks the compiled code paths (bf16/fp16 `tl.dot`,
autotuned configurations, split-K atomics, cuSPARSELt) that the interpreter cannot.

scripts/gpu_check.sh runs the decisive ones first, as their own call (`-k "two_four or dispatch"`)."""

import pytest
import torch

from optimum_oats.kernels import dispatch, gpu
from optimum_oats.kernels.workspaces import release_workspaces
from optimum_oats.nn import LinearSparseLowRank, pack_bitmask
from optimum_oats.nn.kernel_execution import choose_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _layer(d_out, d_in, rank, dtype, nm=False, device="cuda"):
    generator = torch.Generator(device=device).manual_seed(d_out + d_in)
    if nm:
        mask = torch.zeros(d_out, d_in // 4, 4, dtype=torch.bool, device=device)
        mask.scatter_(2, torch.rand(d_out, d_in // 4, 4, device=device, generator=generator).topk(2, 2).indices, True)
        mask = mask.view(d_out, d_in)
    else:
        mask = torch.rand(d_out, d_in, device=device, generator=generator) < torch.rand(d_out, 1, device=device)
    layer = LinearSparseLowRank(d_in, d_out, rank=rank, nnz=int(mask.sum()), bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        layer.weight_mask.copy_(pack_bitmask(mask))
        for tensor in (layer.weight, layer.lowrank_u, layer.lowrank_v, layer.bias):
            tensor.normal_(0, 0.1, generator=generator)
    return layer.requires_grad_(False)


def _error(layer, x, out):
    expected = x.double() @ layer.to_dense().double().T + layer.bias.double()
    return float((out.double() - expected).norm() / expected.norm())


def _tolerance(dtype):
    return 1e-4 if dtype == torch.float32 else 2e-2


def test_two_four_prefill():
    layer = _layer(512, 1024, 8, torch.bfloat16, nm=True)
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert choose_path(layer, x) == "semi_structured"
        out = layer(x)
    assert torch.device("cuda", torch.cuda.current_device()) not in gpu.semi_structured_failed, "cuSPARSELt failed"
    assert _error(layer, x, out) < 2e-2


@pytest.mark.parametrize("tokens", [1, 64])
@pytest.mark.parametrize("mode", ["auto", "sparse_kernel", "workspace"])
def test_dispatch_runs_triton_on_cuda(monkeypatch, mode, tokens):
    # The library's dispatch, not a direct call: a CUDA call in the layer's dtype must reach a Triton path.
    layer = _layer(256, 512, 16, torch.bfloat16)
    layer.set_execution_mode(mode)
    calls = []
    original = gpu.run
    monkeypatch.setattr(gpu, "run", lambda path, w, x: calls.append(path) or original(path, w, x))
    x = torch.randn(tokens, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    expected = (
        "triton_workspace" if mode == "workspace" or tokens > dispatch.GPU_MAX_DECODE_TOKENS else "triton_decode"
    )
    assert calls == [expected]
    assert _error(layer, x, out) < 2e-2


def test_dispatch_compiled_model_on_cuda_has_no_graph_break():
    from tests.helpers.compressed import tiny_compressed_llama

    model = tiny_compressed_llama(dtype=torch.bfloat16).cuda()
    ids = torch.arange(5, device="cuda").view(1, 5)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model(input_ids=x, use_cache=False).logits, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.float()
        got = compiled(ids).float()
    assert (got - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("d_out", "d_in", "rank"), [(256, 512, 16), (301, 777, 0), (1024, 4096, 102)])
@pytest.mark.parametrize("tokens", [1, 4, 16, 100])
def test_compiled_matches_reference(dtype, d_out, d_in, rank, tokens):
    layer = _layer(d_out, d_in, rank, dtype)
    x = torch.randn(tokens, d_in, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert choose_path(layer, x) in dispatch.GPU_PATHS
        out = layer(x)
    assert _error(layer, x, out) < _tolerance(dtype)
    release_workspaces()


@pytest.mark.parametrize("split_k", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 8])
def test_split_k_on_the_gpu(split_k, tokens):
    layer = _layer(1024, 4096, 64, torch.bfloat16)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = gpu.triton_forward(x, layer.packed(), split_k=split_k)
    assert _error(layer, x, out) < 2e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_layer_on_the_second_gpu_runs_there():
    layer = _layer(256, 512, 8, torch.bfloat16, device="cuda:1")
    x = torch.randn(2, 512, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0), torch.no_grad():
        out = layer(x)
    assert out.device == x.device and _error(layer, x, out) < 2e-2


def test_training_call_warns_once_and_stays_right():
    dispatch._GRAD_WARNED.clear()
    layer = _layer(64, 128, 4, torch.float32).requires_grad_(True)
    x = torch.randn(3, 128, device="cuda")
    with pytest.warns(RuntimeWarning, match="no_grad"):
        out = layer(x)
    out.sum().backward()
    assert layer.weight.grad is not None
    dispatch._GRAD_WARNED.clear()


# Quantized values decoded by the compiled kernels (3-bit: codes spanning two bytes; the 4-bit point is in
# benchmarks/gpu.py's check). A few cases only: each (bits, tokens tile) autotunes its own compiled configurations.
@pytest.mark.parametrize("tokens", [1, 8, 100])  # row reduction, tl.dot on the decoded bf16 tile, decompression
def test_quantized_values_on_the_triton_paths(tokens):
    from tests.helpers.compressed import quantized_layer

    layer = quantized_layer(301, 777, value_bits=3, group_size=128, rank=16, dtype=torch.bfloat16).cuda()
    x = torch.randn(tokens, 777, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert choose_path(layer, x) == (
            "triton_decode" if tokens <= dispatch.GPU_MAX_DECODE_TOKENS else "triton_workspace"
        )
        out = layer(x)
        exact = dispatch.dense_sparse(layer.packed()._replace(lowrank_u=layer.lowrank_u.float()))
        dense = torch.empty(301, 777, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(gpu.triton_decompress(layer.packed(), dense), exact.to(torch.bfloat16))  # RTNE on a GPU
    assert _error(layer, x, out) < 2e-2
    release_workspaces()
