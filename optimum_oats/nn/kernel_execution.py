"""The compiled `"sparse_kernel"` execution mode, the `"auto"` mode choosing per call, and a model-wide setter.

`"sparse_kernel"` reads S straight from the stored kept values and packed bitmask (plus a per-row offset table
derived on first use, 8 bytes per output row), so a decode step reads about half the bytes of the dense matrix.
It is inference-only: whenever autograd would need gradients, or the kernel cannot run (not CPU, a dtype other
than float32/bfloat16, extension unavailable), it falls back to the differentiable `"decompress"` path.

On CUDA, both `"sparse_kernel"` and `"auto"` run the Triton path of `optimum_oats.kernels.gpu` (decode kernel for few
tokens, shared workspace or 2:4 semi-structured GEMM for prefill, chosen per call there) when [`gpu_eligible`]: no
gradient needed, `x` in the layer's dtype (bf16/fp16/fp32) and Triton importable. That module is imported on the first
CUDA call only, and imports Triton only then, so the CPU build never needs either.

`"auto"` (the default) picks per call from the number of tokens, see [`choose_mode`]; the rule and the measured
crossover are documented in docs/inference.md.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

import torch
import torch.nn.functional as F

from ..kernels import load_kernel, ops  # noqa: F401  (ops registers optimum_oats::sparse_lowrank_forward)
from .execution import Layer, _low_rank, decompress_forward, register_execution_mode

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# Largest number of tokens (rows of x) for which "auto" uses the kernel, per dtype; above it the "workspace" mode (one
# dense GEMM on decompressed S) is as fast or faster on the measured CPU (benchmarks/speed.py --section layers).
AUTO_MAX_KERNEL_TOKENS = {torch.float32: 16, torch.bfloat16: 8}
GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the Triton kernels take
_GPU_MODULE = "optimum_oats.kernels.gpu"


def row_offsets(layer: Layer) -> torch.Tensor:
    """Start of each row's kept values in `layer.weight` (the layer caches it: [`LinearSparseLowRank.row_offsets`])."""
    return layer.row_offsets()


def _needs_grad(layer: Layer, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))


def _storage(layer: Layer) -> tuple[torch.Tensor, ...]:
    """(values, mask, U, V, bias) read from the module's dicts: `Module.__getattr__` costs ~1.4 us per tensor, a
    few % of a decode step over 200 layers. Falls back to attribute access if a wrapper moved them."""
    params, buffers = layer._parameters, layer._buffers
    try:
        bias = params["bias"] if "bias" in params else layer.bias
        return params["weight"], buffers["weight_mask"], params["lowrank_u"], params["lowrank_v"], bias
    except KeyError:
        return layer.weight, layer.weight_mask, layer.lowrank_u, layer.lowrank_v, layer.bias


def _usable_kernel(layer: Layer, x: torch.Tensor) -> ModuleType | None:
    # Cheap checks first: this runs on every decode step of every layer.
    dtype = x.dtype
    weight = layer._parameters.get("weight")
    weight_dtype = layer.weight.dtype if weight is None else weight.dtype
    if not (x.is_cpu and dtype in KERNEL_DTYPES and dtype == weight_dtype) or _needs_grad(layer, x):
        return None
    return load_kernel()


def _fast_kernel(layer: Layer, x: torch.Tensor) -> ModuleType | None:
    """The kernel when it can run this call and has a vector decode path (AVX-512 or AVX2): the portable build is
    correct but tens of times slower than a dense GEMV, so "auto" never picks it (an explicit "sparse_kernel" may)."""
    kernel = _usable_kernel(layer, x)
    return kernel if kernel is not None and _vector_isa(kernel) else None


_VECTOR_ISA: dict[int, bool] = {}


def _vector_isa(kernel: ModuleType) -> bool:
    key = id(kernel)
    if key not in _VECTOR_ISA:
        _VECTOR_ISA[key] = (
            getattr(kernel, "isa", lambda: "avx512" if kernel.uses_avx512() else "portable")() != "portable"
        )
    return _VECTOR_ISA[key]


def gpu_eligible(
    device_type: str, x_dtype: torch.dtype, weight_dtype: torch.dtype, needs_grad: bool, triton_ready: bool
) -> bool:
    """Whether a call goes to the Triton GPU path: a CUDA input, no gradient needed, the input in the layer's dtype
    (bf16, fp16 or fp32), and Triton usable (`optimum_oats.kernels.gpu.triton_available`). A pure function of those."""
    return (
        device_type == "cuda" and not needs_grad and x_dtype == weight_dtype and x_dtype in GPU_DTYPES and triton_ready
    )


def _gpu_path(layer: Layer, x: torch.Tensor) -> ModuleType | None:
    """`optimum_oats.kernels.gpu` when [`gpu_eligible`] for this call, else None. Never imports it for a CPU input."""
    if not x.is_cuda:
        return None
    from ..kernels import gpu  # lazy: only CUDA calls load the GPU module (it imports Triton only when usable)

    needs_grad = _needs_grad(layer, x)
    # Triton is looked up (imported once) only for a call that could use it.
    ready = not needs_grad and x.dtype == layer.weight.dtype and gpu.triton_available(x)
    return gpu if gpu_eligible(x.device.type, x.dtype, layer.weight.dtype, needs_grad, ready) else None


def _run_gpu(gpu: ModuleType, layer: Layer, x: torch.Tensor) -> torch.Tensor:
    return gpu.layer_forward(layer, x, row_offsets(layer))


def kernel_supports(layer: Layer, x: torch.Tensor) -> bool:
    """Whether the compiled kernel can compute this call (else the PyTorch path is used)."""
    return _usable_kernel(layer, x) is not None


def _run_kernel(kernel: ModuleType, layer: Layer, x: torch.Tensor) -> torch.Tensor:
    # Parameters go in as they are: the call is outside autograd (checked by _usable_kernel), and the C++ side
    # checks contiguity and reshapes x, which is cheaper than doing it here per call. Under torch.compile the same
    # function goes through its registered custom op (traceable, no graph break); eager calls skip the op's
    # dispatcher overhead (~10 us, several % of a decode step).
    run = (
        torch.ops.optimum_oats.sparse_lowrank_forward
        if torch.compiler.is_compiling()
        else kernel.sparse_lowrank_forward
    )
    values, mask, lowrank_u, lowrank_v, bias = _storage(layer)
    return run(x, values, mask, layer.row_offsets(), lowrank_u, lowrank_v, bias)


@register_execution_mode("sparse_kernel")
def sparse_kernel_forward(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Compiled kernel on the compact storage (C++ on the CPU, Triton on CUDA; no dense matrix kept); falls back to
    "decompress"."""
    gpu = _gpu_path(layer, x)
    if gpu is not None:
        return _run_gpu(gpu, layer, x)
    kernel = _usable_kernel(layer, x)
    return decompress_forward(layer, x) if kernel is None else _run_kernel(kernel, layer, x)


_WORKSPACES = threading.local()  # per thread: {(shape, dtype, device): buffer}


def workspace(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The buffer every layer of this shape decompresses S into (one per shape, dtype and thread)."""
    buffers = _WORKSPACES.__dict__.setdefault("buffers", {})
    key = (shape, dtype, device)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


def release_workspaces() -> None:
    """Free this thread's prefill workspaces, and the GPU path's if it was loaded (rebuilt on the next long prompt)."""
    _WORKSPACES.__dict__.pop("buffers", None)
    gpu = sys.modules.get(_GPU_MODULE)
    if gpu is not None:
        gpu.clear_workspaces()


@register_execution_mode("workspace")
def workspace_forward(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Prefill at dense speed without a dense copy per layer: S is decompressed (a compiled memory-bound pass) into
    a workspace shared by all layers of its shape, then one dense GEMM. The low-rank term runs on the activations,
    or is added into the workspace when the prompt is long enough for that to be cheaper ([`fold_low_rank`])."""
    if _needs_grad(layer, x):
        return decompress_forward(layer, x)
    buffer = workspace((layer.out_features, layer.in_features), layer.weight.dtype, layer.weight.device)
    kernel = _usable_kernel(layer, x)
    fold = fold_low_rank(layer, x.numel() // layer.in_features)
    with torch.no_grad():
        if kernel is not None:
            kernel.sparse_decompress(layer.weight, layer.weight_mask, row_offsets(layer), buffer)
        else:
            buffer.zero_().masked_scatter_(layer.dense_mask(), layer.weight)
        if fold:
            buffer.addmm_(layer.lowrank_u, layer.lowrank_v)
    y = F.linear(x, buffer, layer.bias)
    return y if fold else _low_rank(layer, x, y)


def fold_low_rank(layer: Layer, tokens: int) -> bool:
    """Whether `U V` added into the workspace (`d_out d_in r` multiply-adds, once per call) costs less than the
    low-rank product on the activations (`tokens r (d_out + d_in)`): from `d_out d_in / (d_out + d_in)` tokens on,
    288 for a 576x576 layer. At 512 tokens this lifts prefill from ~0.85x to ~0.9x dense on SmolLM2 (BENCHMARKS.md)."""
    d_out, d_in = layer.out_features, layer.in_features
    return layer.rank > 0 and tokens * (d_out + d_in) > d_out * d_in


def choose_mode(layer: Layer, x: torch.Tensor) -> str:
    """The mode "auto" runs for this call.

    - autograd needs gradients: "decompress" (differentiable);
    - a CUDA call [`gpu_eligible`] for the Triton path: "sparse_kernel" (which picks decode or prefill on the GPU);
    - a CPU call in float32/bfloat16 with more than `AUTO_MAX_KERNEL_TOKENS[dtype]` tokens (prefill): "workspace",
      S decompressed into a buffer shared by the layers of one shape and one dense GEMM, so a long prompt never
      leaves a dense copy behind ("merged" caches one per layer, and stays an explicit opt-in);
    - fewer tokens (decode, short prompts): "sparse_kernel", bound by bytes read, or "decompress" (always correct)
      where the kernel cannot run (not CPU, another dtype, extension unavailable or disabled).
    """
    if _needs_grad(layer, x):
        return "decompress"
    if _gpu_path(layer, x) is not None:
        return "sparse_kernel"
    if _prefill(layer, x):
        return "workspace"
    return "decompress" if _fast_kernel(layer, x) is None else "sparse_kernel"


def _prefill(layer: Layer, x: torch.Tensor) -> bool:
    """More tokens than the kernel wins on, for a CPU call in a kernel dtype (checked before loading the kernel)."""
    limit = AUTO_MAX_KERNEL_TOKENS.get(x.dtype)
    return limit is not None and x.is_cpu and x.numel() > limit * layer.in_features


@register_execution_mode("auto")
def auto_forward(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Per call: the compiled kernel for few tokens, dense-equivalent for many, "decompress" for training.

    Prefill goes to "workspace" before any kernel check: on a 192x576 bf16 layer the checks cost ~9 us of a 105 us
    call.
    """
    if _needs_grad(layer, x):
        return decompress_forward(layer, x)
    gpu = _gpu_path(layer, x)
    if gpu is not None:
        return _run_gpu(gpu, layer, x)
    if _prefill(layer, x):
        return workspace_forward(layer, x)
    kernel = _fast_kernel(layer, x)
    return decompress_forward(layer, x) if kernel is None else _run_kernel(kernel, layer, x)
