"""The Triton kernels of `optimum_oats.kernels.gpu`, run on the CPU through Triton's interpreter.

`triton.jit` picks interpreter or GPU compilation when a kernel is defined, reading `TRITON_INTERPRET` through
`triton.knobs`; `optimum_oats.kernels.triton_sparse_lowrank` defines its kernels at import, so the module-scoped
fixture below sets the variable and (re)imports that module, then restores both after this file: other tests in
the session (and a GPU run of the suite) keep compiled kernels. Shapes stay small (the interpreter runs each
program in numpy) but cross block and chunk edges: the interpreter configuration is 16 rows x 64 columns for
decode and 8 x 64 for decompression.
"""

import importlib
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from optimum_oats.kernels import dispatch, gpu
from optimum_oats.kernels.operands import OFFSET_CHUNK, PackedWeights, chunk_offsets, is_two_four
from optimum_oats.kernels.workspaces import release_workspaces, workspaces
from optimum_oats.nn import LinearSparseLowRank
from tests.helpers.compressed import quantized_layer

if sys.platform == "linux" and platform.machine() == "x86_64":
    import triton  # noqa: F401  (the `test` extra installs it here: missing is a broken set-up, so fail, not skip)
else:
    pytest.importorskip("triton", reason="Triton is in the `test` extra on Linux x86-64 only")

TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}
MODULE = "optimum_oats.kernels.triton_sparse_lowrank"


def _import_kernels():
    module = sys.modules.get(MODULE)
    return importlib.import_module(MODULE) if module is None else importlib.reload(module)


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    outer = _import_kernels().INTERPRETED  # what the session had (`TRITON_INTERPRET=1` may be set for the run)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        assert _import_kernels().INTERPRETED
        yield
    # Later tests (a GPU run of the suite) get the session's kernels again: compiled unless it interprets.
    assert _import_kernels().INTERPRETED == outer


def _layer(out_features, in_features, rank, *, bias, dtype, seed):
    """A layer with uneven rows: densities from 0 to 1 (an empty row and a full row included)."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    density = torch.rand(out_features, 1, generator=generator)
    density[0] = 0.0
    density[-1] = 1.0
    keep = torch.rand(out_features, in_features, generator=generator) < density
    sparse = linear.weight.detach() * keep
    u = torch.randn(out_features, rank, generator=generator) / 4 if rank else None
    v = torch.randn(rank, in_features, generator=generator) / 4 if rank else None
    layer = LinearSparseLowRank.from_linear(linear.to(dtype), sparse, u, v)
    counts = layer.dense_mask().sum(dim=1)
    assert counts[0] == 0 and counts[-1] == in_features and layer.rank == rank
    return layer


def _packed(layer):
    """The layer's storage, detached (the kernels are inference-only)."""
    return PackedWeights(*(t.detach() if isinstance(t, torch.Tensor) else t for t in layer.packed()))


def _reference(layer, x):
    """`x (S + U V)^T + b` in float64 from the stored tensors: the PyTorch reference (`layer.to_dense()`)."""
    weight = layer.sparse_weight().double() + layer.lowrank_u.double() @ layer.lowrank_v.double()
    y = x.double() @ weight.t()
    return y if layer.bias is None else y + layer.bias.double()


def _assert_close(out, expected, dtype):
    assert out.dtype == dtype and out.shape == expected.shape
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(out.double() / scale, expected / scale, **TOLERANCE[dtype])


# Each shape with one token count (the interpreter takes seconds per case): 1 token is the row-reduction branch,
# 4 and 16 the `tl.dot` branch (a padded and a full token tile); rank 0 and a rank above the 16-wide rank block
# both meet 1 and several tokens; every case in fp32 and bf16.
@pytest.mark.parametrize(
    ("out_features", "in_features", "rank", "bias", "tokens"),
    [
        (37, 77, 3, True, 1),
        (16, 64, 0, False, 4),
        (50, 130, 20, False, 16),
        (5, 9, 1, True, 4),
        (33, 200, 0, True, 1),
        (19, 70, 2, False, 16),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_reference(out_features, in_features, rank, bias, tokens, dtype):
    layer = _layer(out_features, in_features, rank, bias=bias, dtype=dtype, seed=out_features * in_features + rank)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    out = gpu.triton_forward(x, _packed(layer))
    _assert_close(out, _reference(layer, x), dtype)


def test_decode_keeps_leading_dims_and_fp16():
    layer = _layer(24, 40, 4, bias=True, dtype=torch.float16, seed=1)
    x = torch.randn(2, 3, 40).to(torch.float16)
    out = gpu.triton_forward(x, _packed(layer))
    assert out.shape == (2, 3, 24)
    _assert_close(out, _reference(layer, x.view(6, 40)).view(2, 3, 24), torch.float16)


def test_decode_more_tokens_than_one_tile():
    # 40 tokens: three token tiles of 16 (the second grid axis), the last one partial.
    layer = _layer(20, 70, 2, bias=True, dtype=torch.float32, seed=2)
    x = torch.randn(40, 70)
    _assert_close(gpu.triton_forward(x, _packed(layer)), _reference(layer, x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features"), [(37, 77), (8, 64), (19, 130)])
def test_decompress_writes_s_exactly(dtype, out_features, in_features):
    layer = _layer(out_features, in_features, 0, bias=False, dtype=dtype, seed=in_features)
    # A row slice of a wider buffer pre-filled with garbage: every entry must be overwritten, the rest untouched.
    buffer = torch.full((out_features, in_features + 5), 7.0, dtype=dtype)
    out = gpu.triton_decompress(_packed(layer), buffer[:, :in_features])
    assert torch.equal(out, layer.sparse_weight().detach())
    assert (buffer[:, in_features:] == 7.0).all()


@pytest.mark.parametrize(("rank", "bias"), [(0, False), (6, True)])
def test_prefill_through_shared_workspace(rank, bias):
    release_workspaces()
    first = _layer(24, 72, rank, bias=bias, dtype=torch.float32, seed=3)
    second = _layer(24, 72, rank, bias=bias, dtype=torch.float32, seed=4)
    x = torch.randn(3, 11, 72)
    for layer in (first, second, first):
        out = gpu.triton_prefill(x, _packed(layer))
        _assert_close(out, _reference(layer, x.view(33, 72)).view(3, 11, 24), torch.float32)
    assert len(workspaces()) == 1  # one buffer for the shape, shared by both layers
    release_workspaces()


@pytest.mark.parametrize(("tokens", "path"), [(3, "triton_decode"), (40, "triton_workspace")])
def test_gpu_run_for_the_dispatch(tokens, path):
    layer = _layer(40, 96, 5, bias=True, dtype=torch.float32, seed=7)
    x = torch.randn(1, tokens, 96)
    with torch.no_grad():
        out = gpu.run(path, _packed(layer), x)
    _assert_close(out, _reference(layer, x.view(tokens, 96)).view(1, tokens, 40), torch.float32)
    assert not is_two_four(layer.weight_mask, 96)
    release_workspaces()


def test_semi_structured_falls_back_when_unsupported():
    # On the CPU `to_sparse_semi_structured` raises: the call must still be right, warned once, then remembered.
    gpu.semi_structured_failed.clear()
    layer = _layer(32, 64, 2, bias=True, dtype=torch.float32, seed=5)
    x = torch.randn(20, 64)
    with pytest.warns(RuntimeWarning, match="semi-structured"):
        out = gpu.semi_structured_prefill(x, _packed(layer))
    _assert_close(out, _reference(layer, x), torch.float32)
    assert torch.device("cpu") in gpu.semi_structured_failed
    gpu.semi_structured_failed.clear()
    release_workspaces()


def test_bad_storage_is_named():
    w = _packed(_layer(16, 64, 0, bias=False, dtype=torch.float32, seed=6))
    with pytest.raises(ValueError, match="weight_mask"):  # the offsets are checked against the stored values
        gpu.triton_forward(torch.randn(1, 64), w._replace(values=w.values[1:]))
    with pytest.raises(ValueError, match="bitmask"):
        gpu.triton_forward(torch.randn(1, 64), w._replace(mask=w.mask[:, :4].contiguous()))
    with pytest.raises(ValueError, match="features"):
        gpu.triton_forward(torch.randn(1, 63), w)


def test_two_four_detection():
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, 0::4] = True
    mask[:, 3::4] = True  # 2 of every 4
    layer = LinearSparseLowRank(16, 4, rank=0, nnz=int(mask.sum()), bias=False)
    layer.load_decomposition(torch.randn(4, 16) * mask)
    assert is_two_four(layer.weight_mask, 16)
    mask[1, 1] = True  # 3 of 4 in one group
    layer = LinearSparseLowRank(16, 4, rank=0, nnz=int(mask.sum()), bias=False)
    layer.load_decomposition(torch.randn(4, 16).abs().add(0.1) * mask)
    assert not is_two_four(layer.weight_mask, 16)
    assert not is_two_four(torch.zeros(4, 2, dtype=torch.uint8), 14)  # columns not a multiple of 4


@pytest.mark.parametrize(
    ("capability", "dtype", "shape", "tokens", "two_four", "expected"),
    [
        ((9, 0), torch.bfloat16, (4096, 4096), 1, True, "triton_decode"),  # decode: bytes-bound, Triton reads fewer
        ((9, 0), torch.bfloat16, (4096, 4096), 16, True, "triton_decode"),
        ((9, 0), torch.bfloat16, (4096, 4096), 17, True, "semi_structured"),
        ((9, 0), torch.float16, (14336, 4096), 512, True, "semi_structured"),
        ((9, 0), torch.bfloat16, (4096, 4096), 512, False, "triton_workspace"),  # not 2:4
        ((7, 5), torch.bfloat16, (4096, 4096), 512, True, "triton_workspace"),  # no sparse tensor cores
        ((9, 0), torch.float32, (4096, 4096), 512, True, "triton_workspace"),  # fp32 not in the 2:4 GEMM
        ((9, 0), torch.bfloat16, (4100, 4096), 512, True, "triton_workspace"),  # rows not a multiple of 32
        ((9, 0), torch.bfloat16, (4096, 4000), 512, True, "triton_workspace"),  # columns not a multiple of 64
    ],
)
def test_gpu_path_selection(monkeypatch, capability, dtype, shape, tokens, two_four, expected):
    # The hardware query is the only thing faked: the rule itself is what runs on a GPU.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    path = dispatch.choose_gpu_path(
        tokens,
        device=torch.device("cuda"),
        dtype=dtype,
        out_features=shape[0],
        in_features=shape[1],
        two_four=two_four,
    )
    assert path == expected
    assert dispatch.choose_gpu_path(512, device=torch.device("cpu"), dtype=dtype, out_features=64, in_features=64) == (
        "triton_workspace"
    )
    # An explicit "workspace" mode on CUDA decompresses with Triton whatever the token count (not masked_scatter_).
    assert (
        dispatch.choose_gpu_path(
            tokens,
            device=torch.device("cuda"),
            dtype=dtype,
            out_features=shape[0],
            in_features=shape[1],
            mode="workspace",
        )
        == "triton_workspace"
    )


@pytest.mark.slow
def test_cpu_build_works_without_triton():
    # The CPU build must not need Triton: with it missing (blocked in a fresh process), the package imports, a
    # compressed layer runs on the CPU, and the GPU path reports itself unavailable instead of failing.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # what `import triton` sees when it is not installed
        import torch
        from optimum_oats.kernels import gpu
        from optimum_oats.nn import LinearSparseLowRank
        ones = torch.ones
        layer = LinearSparseLowRank.from_linear(torch.nn.Linear(8, 4), torch.eye(4, 8), ones(4, 1), ones(1, 8))
        with torch.no_grad():
            y = layer(torch.ones(2, 8))
        assert torch.allclose(y - layer.bias, torch.full((2, 4), 9.0)), y
        assert not gpu.triton_ready()
        assert gpu._triton_module() is None
        assert "optimum_oats.kernels.triton_sparse_lowrank" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "OATS_DISABLE_KERNELS": "1"}  # the PyTorch path: no C++ build in this child process
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_chunk_offsets_count_the_kept_weights_before_each_chunk():
    layer = _layer(9, 3 * OFFSET_CHUNK + 5, 0, bias=False, dtype=torch.float32, seed=8)
    table = chunk_offsets(layer.weight_mask)
    dense = layer.dense_mask().long()
    starts = range(0, layer.in_features, OFFSET_CHUNK)
    expected = torch.stack([dense[:, :start].sum(dim=1) for start in starts], dim=1)
    assert table.dtype == torch.int32 and torch.equal(table.long(), expected)
    assert chunk_offsets(layer.weight_mask) is table  # cached with the mask ...
    with torch.no_grad():
        layer.weight_mask[0, 0] ^= 1  # ... until it changes in place
    assert chunk_offsets(layer.weight_mask) is not table


# Split-K: the columns of each row block shared by 2 or 3 programs (the last split shorter), partial sums added
# atomically in float32; with 1 and several tokens, with and without the low-rank term (added by split 0 only).
@pytest.mark.parametrize(("split_k", "tokens", "rank"), [(2, 1, 3), (3, 4, 0), (2, 16, 5), (4, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_decode_matches_reference(split_k, tokens, rank, dtype):
    layer = _layer(21, 200, rank, bias=True, dtype=dtype, seed=split_k * 10 + tokens)
    x = torch.randn(tokens, 200, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = gpu.triton_forward(x, _packed(layer), split_k=split_k)
    _assert_close(out, _reference(layer, x), dtype)


def test_launches_run_under_the_device_guard_of_the_input(monkeypatch):
    entered = []
    real = gpu.on_device
    monkeypatch.setattr(gpu, "on_device", lambda device: entered.append(device) or real(device))
    layer = _layer(16, 64, 2, bias=True, dtype=torch.float32, seed=9)
    x = torch.randn(2, 64)
    gpu.run("triton_decode", _packed(layer), x)
    gpu.run("triton_workspace", _packed(layer), torch.randn(30, 64))
    assert entered and all(device == x.device for device in entered)
    guard = real(torch.device("cuda", 1))  # a layer on cuda:1 launches there, not on the current device
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    release_workspaces()


def test_explicit_workspace_mode_takes_the_triton_decompression(monkeypatch):
    # The path an explicit "workspace" mode gets on CUDA, run here through the interpreter: S comes from the Triton
    # decompression kernel into the shared workspace (not `masked_scatter_`).
    kernels = gpu._kernels()
    calls = []
    real = kernels.decompress
    monkeypatch.setattr(kernels, "decompress", lambda *args: calls.append(1) or real(*args))
    layer = _layer(24, 72, 3, bias=True, dtype=torch.float32, seed=10)
    x = torch.randn(2, 72)
    out = dispatch.run_path("triton_workspace", _packed(layer), x)
    assert calls == [1]
    _assert_close(out, _reference(layer, x), torch.float32)
    release_workspaces()


def test_compiled_model_on_the_triton_paths_has_no_graph_break_and_matches_eager(monkeypatch):
    # The CUDA implementation's paths, run here through the interpreter: the op's choice is pointed at them (a CPU
    # tensor would otherwise take the C++ kernel), everything else is what a GPU run traces.
    from tests.helpers.compressed import tiny_compressed_llama

    taken = []

    def triton_paths(w, x, mode):
        taken.append(
            "triton_decode" if dispatch.tokens_of(w, x) <= dispatch.GPU_MAX_DECODE_TOKENS else "triton_workspace"
        )
        return taken[-1], None

    model = tiny_compressed_llama(layers=1)  # one block: the interpreter runs every program in numpy
    with torch.no_grad():
        ids = {tokens: (torch.arange(tokens).view(1, tokens) * 5) % 128 for tokens in (1, 20)}
        reference = {tokens: model(input_ids=x, use_cache=False).logits for tokens, x in ids.items()}  # C++ / PyTorch
        monkeypatch.setattr(dispatch, "plan", triton_paths)

        def logits(x):
            return model(input_ids=x, use_cache=False).logits

        torch._dynamo.reset()
        # fullgraph=True raises on any graph break (what `torch._dynamo.explain` counts, in tests/nn/test_compile.py).
        compiled = torch.compile(logits, fullgraph=True, backend="aot_eager", dynamic=False)
        for tokens, x in ids.items():
            taken.clear()
            torch.testing.assert_close(compiled(x), reference[tokens], rtol=1e-4, atol=1e-4)
            assert len(taken) == 7 and set(taken) == {"triton_decode" if tokens == 1 else "triton_workspace"}
    release_workspaces()


# ---------------------------------------------------------------------------------------------- quantized values
# The kernels read the codes and fp16 group scales as stored (`PackedWeights.values` uint8 bit stream): code widths
# 3 (codes spanning two bytes), 4 and 8, groups of 8 (several per column block) and 128 (wider than a block), odd
# widths (a partial mask byte, a partial group, a partial column block).
def _quantized(out_features, in_features, bits, group_size, rank, dtype, seed=0):
    layer = quantized_layer(
        out_features, in_features, value_bits=bits, group_size=group_size, rank=rank, dtype=dtype, seed=seed
    )
    w = _packed(layer)
    assert w.quantized and w.values.dtype == torch.uint8 and gpu.takes(w)
    return w


def _exact_decode(w):
    """S decoded in float32 by the one PyTorch formula (`dense_sparse` before its rounding to the layer's dtype)."""
    return dispatch.dense_sparse(w._replace(lowrank_u=w.lowrank_u.float()))


@pytest.mark.parametrize(
    ("bits", "group_size", "shape", "dtype"),
    [
        (3, 8, (37, 77), torch.float32),
        (4, 128, (19, 130), torch.bfloat16),
        (8, 8, (37, 77), torch.float16),
        (3, 128, (8, 64), torch.float16),
        (4, 12, (16, 77), torch.float32),  # a group size the C++ kernel does not take (splits a mask byte)
        (8, 128, (9, 200), torch.bfloat16),
    ],
)
def test_decompress_decodes_quantized_values(bits, group_size, shape, dtype):
    out_features, in_features = shape
    w = _quantized(out_features, in_features, bits, group_size, 0, dtype, seed=bits + group_size)
    buffer = torch.full((out_features, in_features + 3), 7.0, dtype=dtype)
    out = gpu.triton_decompress(w, buffer[:, :in_features])
    exact = _exact_decode(w)
    if dtype == torch.bfloat16:
        # The interpreter's fp32 -> bf16 cast truncates (a GPU rounds to nearest, as torch does): within one bf16 ulp.
        torch.testing.assert_close(out.float(), exact, rtol=2**-7, atol=0)
        assert torch.equal(out == 0, exact == 0)
    else:
        assert torch.equal(out, dispatch.dense_sparse(w))  # fp32 and fp16: bit for bit the PyTorch decode
    assert (buffer[:, in_features:] == 7.0).all()


@pytest.mark.parametrize(
    ("bits", "group_size", "shape", "rank", "dtype", "tokens", "split_k"),
    [
        (3, 8, (37, 77), 3, torch.float32, 1, None),
        (4, 128, (19, 130), 0, torch.bfloat16, 4, None),
        (8, 8, (24, 77), 20, torch.float16, 16, None),
        (4, 8, (21, 200), 2, torch.float32, 2, 2),  # split-K: each split starts mid-stream of codes
        (3, 128, (16, 70), 0, torch.bfloat16, 1, None),
    ],
)
def test_decode_reads_quantized_values(bits, group_size, shape, rank, dtype, tokens, split_k):
    out_features, in_features = shape
    w = _quantized(out_features, in_features, bits, group_size, rank, dtype, seed=bits * tokens)
    x = torch.randn(2, tokens, in_features, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    out = gpu.triton_forward(x, w, split_k=split_k)
    weight = _exact_decode(w).double() + w.lowrank_u.double() @ w.lowrank_v.double()
    expected = x.double() @ weight.t() + w.bias.double()
    assert out.shape == (2, tokens, out_features)
    _assert_close(out, expected, dtype)
    reference = dispatch.decompress_linear(w, x)  # the PyTorch path the CUDA calls used to fall back to
    _assert_close(reference, expected, dtype)


def test_quantized_prefill_and_semi_structured_fallback_decompress_with_triton(monkeypatch):
    kernels = gpu._kernels()
    calls = []
    real = kernels.decompress
    monkeypatch.setattr(kernels, "decompress", lambda *args: calls.append(args[5].bits) or real(*args))
    w = _quantized(32, 64, 4, 8, 3, torch.float32)
    x = torch.randn(20, 64)
    expected = dispatch.decompress_linear(w, x)
    release_workspaces()
    _assert_close(gpu.triton_prefill(x, w), expected.double(), torch.float32)
    assert [key[1] for key in workspaces()] == [torch.float32]  # the layer's dtype, not the codes' uint8
    gpu.semi_structured_failed.clear()
    with pytest.warns(RuntimeWarning, match="semi-structured"):  # the CPU has no 2:4 GEMM: falls back, still right
        _assert_close(gpu.semi_structured_prefill(x, w), expected.double(), torch.float32)
    assert calls == [4, 4]
    gpu.semi_structured_failed.clear()
    release_workspaces()


def test_quantized_storage_is_checked():
    w = _quantized(16, 64, 4, 8, 0, torch.float32)
    with pytest.raises(ValueError, match="weight_codes"):  # the offsets are checked against the stored code bytes
        gpu.triton_forward(torch.randn(1, 64), w._replace(values=w.values[1:]))
    with pytest.raises(ValueError, match="weight_scales"):
        gpu.triton_forward(torch.randn(1, 64), w._replace(value_scales=w.value_scales[:, :1].contiguous()))
    assert not gpu.takes(w._replace(value_bits=1))
