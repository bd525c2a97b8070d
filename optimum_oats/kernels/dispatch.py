"""Which kernel computes a `LinearSparseLowRank` call: every selection rule in one module, and the paths they name.

[`choose_path`] maps (storage, input, execution mode) to one path; [`run_path`] runs it. Both take the layer's
storage as [`PackedWeights`], never the module. The `torch.library` op of `ops.py` calls them inside its CPU and
CUDA implementations, and eager calls reach them directly (`ops.linear`), skipping the dispatcher.

Paths:
- `"cpu_kernel"`: the C++ kernel on the compact storage (decode: bound by bytes read). CPU, fp32/bf16, built.
- `"workspace"`: S decompressed (by the C++ kernel where it runs, else PyTorch) into a buffer shared by every layer
  of its shape ([`workspace`]), then one dense GEMM: prefill at dense speed without a dense copy per layer.
- `"decompress"`: S rebuilt densely for this call (PyTorch): always correct, any device and dtype.
- `"triton_decode"`, `"triton_workspace"`, `"semi_structured"`: the CUDA paths of `gpu.py` (imported on the first
  eligible CUDA call only, so the CPU build never needs Triton).

The rules (measured crossovers in docs/inference.md and BENCHMARKS.md):
- `"auto"` on the CPU: more than `AUTO_MAX_KERNEL_TOKENS[dtype]` tokens is prefill, `"workspace"`; fewer is
  `"cpu_kernel"` when the kernel has a vector decode path (the portable build is tens of times slower than a dense
  GEMV), else `"decompress"`;
- `"sparse_kernel"` on the CPU: `"cpu_kernel"` whenever it can run (portable build included), else `"decompress"`;
- on CUDA when [`gpu_eligible`]: at most `GPU_MAX_DECODE_TOKENS` tokens `"triton_decode"`, more `"semi_structured"`
  for a 2:4 mask on sparse tensor cores, else `"triton_workspace"`; an explicit `"workspace"` always takes the
  Triton decompression. Not eligible: `"decompress"` (or the PyTorch workspace for `"workspace"`).
Gradients are the caller's concern: these paths are inference-only (`nn/kernel_execution.py` sends calls that need
autograd to the differentiable PyTorch mode first).
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
import torch.nn.functional as F

from ..utils.quantization import dequantize_codes, expand_scales, unpack_codes
from . import load_kernel
from .operands import PackedWeights, is_two_four
from .packing import unpack_bitmask
from .workspaces import release_workspaces, workspace

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the C++ kernel takes
KERNEL_VALUE_BITS = (3, 4, 6, 8)  # the code widths the C++ kernel decodes on the fly
GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the Triton kernels take
# Largest number of tokens (rows of x) for which "auto" uses the CPU kernel, per dtype; above it "workspace" is as
# fast or faster on the measured CPU (benchmarks/speed.py --section layers).
AUTO_MAX_KERNEL_TOKENS = {torch.float32: 16, torch.bfloat16: 8}
# Most tokens for which the Triton decode kernel is chosen; above it the workspace + dense GEMM (compute-bound) wins.
# A first guess from the bytes/FLOP balance of an H100/H200: benchmarks/gpu.py measures the crossover
# (decode against the workspace path from 1 to 2048 tokens) and this constant should follow its numbers.
GPU_MAX_DECODE_TOKENS = 16
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
SEMI_STRUCTURED_MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere and later
SEMI_STRUCTURED_MULTIPLE = (32, 64)  # rows, columns of S: the strictest of torch's CUTLASS/cuSPARSELt constraints
KERNEL_MODES = ("auto", "sparse_kernel", "workspace")  # the execution modes that come here
CPU_PATHS = ("cpu_kernel", "workspace", "decompress")
GPU_PATHS = ("triton_decode", "triton_workspace", "semi_structured")


def tokens_of(w: PackedWeights, x: torch.Tensor) -> int:
    return x.numel() // max(1, w.in_features)


def needs_grad(w: PackedWeights, x: torch.Tensor) -> bool:
    """Whether autograd needs this call's graph (then only the differentiable PyTorch path is right)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or w.values.requires_grad or w.lowrank_u.requires_grad or w.lowrank_v.requires_grad
    )


def kernel_takes(w: PackedWeights) -> bool:
    """Whether the C++ kernel reads this storage: float values, or codes whose groups hold whole mask bytes."""
    return not w.quantized or (w.value_bits in KERNEL_VALUE_BITS and w.group_size % 8 == 0)


_GRAD_WARNED: set[str] = set()


def warn_dense_training_once(w: PackedWeights, x: torch.Tensor) -> None:
    """Warn once per process when a CUDA call builds a dense S per call only because parameters require grad."""
    if x.is_cuda and not x.requires_grad and "cuda" not in _GRAD_WARNED:
        _GRAD_WARNED.add("cuda")
        warnings.warn(
            "A compressed layer ran on CUDA with gradients enabled and parameters that require grad, so it rebuilt "
            "a dense S per call (the differentiable path) instead of the Triton kernels. For inference, run under "
            "`torch.no_grad()` / `torch.inference_mode()` or call `model.requires_grad_(False)`.",
            RuntimeWarning,
            stacklevel=4,
        )


# ------------------------------------------------------------------------------------------------ CPU rules
_VECTOR_ISA: dict[int, bool] = {}


def _vector_isa(kernel: ModuleType) -> bool:
    key = id(kernel)
    if key not in _VECTOR_ISA:
        _VECTOR_ISA[key] = (
            getattr(kernel, "isa", lambda: "avx512" if kernel.uses_avx512() else "portable")() != "portable"
        )
    return _VECTOR_ISA[key]


def cpu_kernel(w: PackedWeights, x: torch.Tensor, *, vector_only: bool = False) -> ModuleType | None:
    """The C++ extension when it can compute this call (CPU, fp32/bf16 input in the layer's dtype, built), else None;
    with `vector_only`, also None for the portable build."""
    if not (x.is_cpu and x.dtype in KERNEL_DTYPES and x.dtype == w.dtype and kernel_takes(w)):
        return None
    kernel = load_kernel()
    if kernel is None or (vector_only and not _vector_isa(kernel)):
        return None
    return kernel


def cpu_prefill(w: PackedWeights, x: torch.Tensor) -> bool:
    """More tokens than the CPU kernel wins on, for a CPU call in a kernel dtype (checked before loading it)."""
    limit = AUTO_MAX_KERNEL_TOKENS.get(x.dtype)
    return limit is not None and x.is_cpu and x.numel() > limit * w.in_features


# ------------------------------------------------------------------------------------------------ GPU rules
def gpu_eligible(
    device_type: str, x_dtype: torch.dtype, weight_dtype: torch.dtype, needs_grad: bool, triton_ready: bool
) -> bool:
    """Whether a call goes to the Triton GPU path: a CUDA input, no gradient needed, the input in the layer's dtype
    (bf16, fp16 or fp32), and Triton usable (`gpu.triton_available`). A pure function of those."""
    return (
        device_type == "cuda" and not needs_grad and x_dtype == weight_dtype and x_dtype in GPU_DTYPES and triton_ready
    )


def semi_structured_supported(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether PyTorch's semi-structured sparse GEMM can run this layer: CUDA with sparse tensor cores, fp16/bf16,
    S's rows a multiple of 32 and columns a multiple of 64 (torch's shape constraints), and no earlier failure."""
    from .gpu import semi_structured_failed  # (no Triton import: the set of devices where the 2:4 GEMM raised)

    device = torch.device(device)
    if device.type != "cuda" or dtype not in SEMI_STRUCTURED_DTYPES or device in semi_structured_failed:
        return False
    rows, cols = SEMI_STRUCTURED_MULTIPLE
    if out_features % rows or in_features % cols:
        return False
    return torch.cuda.get_device_capability(device) >= SEMI_STRUCTURED_MIN_CAPABILITY


def choose_gpu_path(
    tokens: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    out_features: int,
    in_features: int,
    two_four: bool = False,
    mode: str = "auto",
) -> str:
    """The GPU path for one eligible call: `"triton_decode"`, `"semi_structured"` or `"triton_workspace"`.

    `two_four` is the mask's cached [`is_two_four`]; the semi-structured GEMM is used for prefill only (it pays off
    on compute-bound calls; decode is bound by bytes and the Triton kernel reads fewer). An explicit `"workspace"`
    mode always decompresses with Triton into the shared workspace.
    """
    if mode == "workspace":
        return "triton_workspace"
    if tokens <= GPU_MAX_DECODE_TOKENS:
        return "triton_decode"
    if two_four and semi_structured_supported(device, dtype, out_features, in_features):
        return "semi_structured"
    return "triton_workspace"


def gpu_module(w: PackedWeights, x: torch.Tensor) -> ModuleType | None:
    """`optimum_oats.kernels.gpu` when this call is [`gpu_eligible`], else None; never imported for a CPU input."""
    if not x.is_cuda:
        return None
    from . import gpu  # lazy: only CUDA calls load the GPU module (it imports Triton only when usable)

    grad = needs_grad(w, x)
    same = x.dtype == w.dtype
    ready = (
        not grad and same and x.dtype in GPU_DTYPES and gpu.takes(w) and gpu.triton_ready()
    )  # Triton is looked up only for a call that could use it
    return gpu if gpu_eligible(x.device.type, x.dtype, w.dtype, grad, ready) else None


# ------------------------------------------------------------------------------------------------ the choice
def plan(w: PackedWeights, x: torch.Tensor, mode: str = "auto") -> tuple[str, ModuleType | None]:
    """The path (see module docstring) that computes this call in execution mode `mode`, and the C++ extension when
    that path is `"cpu_kernel"` (looked up once per call: this runs on every decode step of every layer)."""
    if x.is_cuda:
        if gpu_module(w, x) is None:
            return ("workspace" if mode == "workspace" else "decompress"), None
        tokens = tokens_of(w, x)
        two_four = mode != "workspace" and tokens > GPU_MAX_DECODE_TOKENS and is_two_four(w.mask, w.in_features)
        path = choose_gpu_path(
            tokens, device=x.device, dtype=x.dtype, out_features=w.out_features, in_features=w.in_features,
            two_four=two_four, mode=mode,
        )  # fmt: skip
        return path, None
    if mode == "workspace" or (mode == "auto" and cpu_prefill(w, x)):
        return "workspace", None
    if mode not in KERNEL_MODES:
        raise ValueError(f"`mode` must be one of {KERNEL_MODES}, got {mode!r}.")
    kernel = cpu_kernel(w, x, vector_only=mode == "auto")
    return ("decompress", None) if kernel is None else ("cpu_kernel", kernel)


def choose_path(w: PackedWeights, x: torch.Tensor, mode: str = "auto") -> str:
    """The path (see module docstring) that computes this call in execution mode `mode`."""
    return plan(w, x, mode)[0]


# ------------------------------------------------------------------------------------------------ the paths
def kept_values(w: PackedWeights) -> torch.Tensor:
    """The kept values of S, 1-D row-major: `values`, or decoded from quantized codes (float32, by the one decode
    formula `dequantize_codes`, so every path agrees with what compression chose)."""
    if not w.quantized:
        return w.values
    spec = w.value_spec
    rows, cols = unpack_bitmask(w.mask, w.in_features).nonzero(as_tuple=True)  # row-major: the values' order
    codes = unpack_codes(w.values, spec.bits, rows.numel())
    return dequantize_codes(codes, w.scales_float()[rows, cols // spec.group_size], spec)


def dense_sparse(w: PackedWeights) -> torch.Tensor:
    """S as a dense tensor in the layer's dtype, by PyTorch ops (differentiable with respect to float `values`)."""
    mask = unpack_bitmask(w.mask, w.in_features)
    if w.quantized:
        spec = w.value_spec
        codes = torch.zeros(mask.shape, dtype=torch.uint8, device=mask.device)
        codes.masked_scatter_(mask, unpack_codes(w.values, spec.bits, int(mask.sum())))
        dense = dequantize_codes(codes, expand_scales(w.scales_float(), w.in_features, spec), spec)
        return dense.masked_fill_(~mask, 0.0).to(w.dtype)
    return w.values.new_zeros(w.out_features, w.in_features).masked_scatter(mask, w.values)


def add_low_rank(w: PackedWeights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y + (x Vᵀ) Uᵀ`: 2 r (d_in + d_out) FLOPs per token, no dense U V."""
    if w.rank == 0:
        return y
    return y + F.linear(F.linear(x, w.lowrank_v), w.lowrank_u)


def decompress_linear(w: PackedWeights, x: torch.Tensor) -> torch.Tensor:
    """`x (S + U V)ᵀ + b` with S rebuilt for this call only: always correct, differentiable, nothing kept."""
    return add_low_rank(w, x, F.linear(x, dense_sparse(w), w.bias))


def fold_low_rank(w: PackedWeights, tokens: int) -> bool:
    """Whether `U V` added into the workspace (`d_out d_in r` multiply-adds, once per call) costs less than the
    low-rank product on the activations (`tokens r (d_out + d_in)`): from `d_out d_in / (d_out + d_in)` tokens on,
    288 for a 576x576 layer. At 512 tokens this lifts prefill from ~0.85x to ~0.9x dense on SmolLM2 (BENCHMARKS.md)."""
    d_out, d_in = w.out_features, w.in_features
    return w.rank > 0 and tokens * (d_out + d_in) > d_out * d_in


def workspace_linear(w: PackedWeights, x: torch.Tensor) -> torch.Tensor:
    """The CPU (or PyTorch) `"workspace"` path: decompress S into the shared buffer, then one dense GEMM."""
    buffer = workspace(w.out_features, w.in_features, w.dtype, w.values.device)
    kernel = cpu_kernel(w, x)
    fold = fold_low_rank(w, tokens_of(w, x))
    with torch.no_grad():
        if kernel is not None and w.quantized:
            kernel.sparse_decompress_quantized(
                w.values,
                w.value_scales,
                w.value_bits,
                w.group_size,
                w.value_spec.offset,
                w.mask,
                w.value_offsets(),
                buffer,
            )
        elif kernel is not None:
            kernel.sparse_decompress(w.values, w.mask, w.value_offsets(), buffer)
        elif w.quantized:
            buffer.copy_(dense_sparse(w))
        else:
            buffer.zero_().masked_scatter_(unpack_bitmask(w.mask, w.in_features), w.values)
        if fold:
            buffer.addmm_(w.lowrank_u, w.lowrank_v)
    y = F.linear(x, buffer, w.bias)
    return y if fold else add_low_rank(w, x, y)


def cpu_kernel_linear(w: PackedWeights, x: torch.Tensor, kernel: ModuleType | None = None) -> torch.Tensor:
    """The `"cpu_kernel"` path. Tensors go in as stored: the C++ side checks contiguity and reshapes `x`."""
    offsets = w.value_offsets()
    kernel = load_kernel() if kernel is None else kernel
    if w.quantized:
        return kernel.sparse_lowrank_forward_quantized(
            x, w.values, w.value_scales, w.value_bits, w.group_size, w.value_spec.offset, w.mask, offsets,
            w.lowrank_u, w.lowrank_v, w.bias,
        )  # fmt: skip
    return kernel.sparse_lowrank_forward(x, w.values, w.mask, offsets, w.lowrank_u, w.lowrank_v, w.bias)


def run_path(path: str, w: PackedWeights, x: torch.Tensor, kernel: ModuleType | None = None) -> torch.Tensor:
    """Compute `x (S + U V)ᵀ + b` on `path` (a name [`choose_path`] returns; `kernel` as [`plan`] returns it)."""
    if path == "cpu_kernel":
        return cpu_kernel_linear(w, x, kernel)
    if path == "workspace":
        return workspace_linear(w, x)
    if path == "decompress":
        return decompress_linear(w, x)
    if path in GPU_PATHS:
        from . import gpu

        return gpu.run(path, w, x)
    raise ValueError(f"`path` must be one of {CPU_PATHS + GPU_PATHS}, got {path!r}.")


__all__ = [
    "AUTO_MAX_KERNEL_TOKENS",
    "GPU_DTYPES",
    "GPU_MAX_DECODE_TOKENS",
    "KERNEL_DTYPES",
    "KERNEL_VALUE_BITS",
    "dense_sparse",
    "kept_values",
    "choose_gpu_path",
    "choose_path",
    "gpu_eligible",
    "plan",
    "needs_grad",
    "release_workspaces",
    "run_path",
    "workspace",
]
