"""GPU speed and memory of compressed layers and models (issue 34), in one short run; markdown tables + JSON.

    python benchmarks/gpu.py                       # one H100/H200: Llama-3-8B shapes, bf16, rho 0.5 (<= 5 min)
    python benchmarks/gpu.py --quick               # fewer repetitions, tokens and blocks
    TRITON_INTERPRET=1 python benchmarks/gpu.py --device cpu --tiny   # CPU rehearsal (tests/benchmarks/test_gpu.py)

Nothing is downloaded: models are built from a `LlamaConfig` with random weights, which is fine for speed and
memory. Compressed layers for the speed parts are built directly at the budget of rho = 0.5 and the default
kappa (`OATSConfig().rank_ratio`): a random row-wise mask of `keep_per_row` entries, random values and random
U, V of the budget's rank. The quantized column is the shipped point (`--quant-rho` 0.3, 4-bit values, 8-bit U V,
groups of 128): random codes, the values kept as codes and decoded where they are read (the Triton kernels on
CUDA). Compression time is measured separately, on a few real blocks, with each method.

Sections, each timed against the `--budget-s` wall-clock limit and written to the JSON as soon as it ends (the
per-layer rows and each compress method's row as soon as they end):

- `env`: GPU, clocks, versions, cuSPARSELt, and the measured device-to-device copy bandwidth (the roofline);
- `check`: the library's dispatch against `x (S + U V)^T` (decode, prefill, a quantized layer, a 2:4 layer) with
  the path each call took; fails if a CUDA call did not take a Triton path;
- `layers`: per layer (Llama-3-8B shapes) x tokens {1, 4, 16, 32, 64, 128, 512, 2048}: eager and CUDA-graph us for
  dense and compressed, the path "auto" takes, the Triton decode and workspace paths forced (the crossover that
  sets `GPU_MAX_DECODE_TOKENS`), the decode kernel's autotuned configuration, compressed GB/s against the copy
  bandwidth, decompress-only us, 2:4 + low rank at prefill, and the quantized layer through the library's
  dispatch (us, speedup over dense, bytes); every timed pass walks over enough copies of the
  layer to exceed the L2 cache (`--cold-bytes`), as in a model where a layer's weights are evicted before the next
  token needs them;
- `model`: a randomly initialised Llama-3-8B-shaped model in bf16: GPU memory, prefill of a 512-token prompt and
  greedy generation tokens/s, dense vs compressed vs quantized;
- `svd`: the SVD timing probe at 4096^2 and 14336x4096 (exact thin SVD and the fast solver's Ritz step);
- `compress`: wall time to compress `--compress-blocks` blocks per method, cheapest first (Wanda, SparseGPT, OATS,
  hassle), skipping a method whose cheaper predecessor already took longer than the time left.

A summary under 12 KB is printed last (the device tool returns only the last 12,000 characters of output).
Timing: CUDA events around `--inner` calls, median of `--reps` repetitions, variants interleaved; on the CPU
`time.perf_counter`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from toolkit.cells import write_cell
from toolkit.models import llama_block_shapes
from toolkit.provenance import Provenance
from torch import nn

from optimum_oats.algorithms import OATSSettings
from optimum_oats.algorithms.budget import layer_budget
from optimum_oats.algorithms.masks import sparsity_mask
from optimum_oats.config import OATSConfig
from optimum_oats.kernels import dispatch, gpu
from optimum_oats.kernels.operands import chunk_offsets
from optimum_oats.kernels.workspaces import release_workspaces, workspace
from optimum_oats.nn import LinearSparseLowRank, pack_bitmask
from optimum_oats.nn.kernel_execution import choose_path
from optimum_oats.utils.quantization import DEFAULT_GROUP_SIZE

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_hidden_layers=32,
    vocab_size=128256,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    vocab_size=512,
)
TOKENS = [1, 4, 16, 32, 64, 128, 512, 2048]
SUMMARY_LIMIT = 12_000  # characters: the device tool returns the last 12,000 of the output
BENCH_MODE = "auto"  # the library default: the Triton path on CUDA (see optimum_oats/nn/kernel_execution.py)


# ---------------------------------------------------------------- building layers and models


def random_compressed(
    d_out: int, d_in: int, rho: float, kappa: float, dtype: torch.dtype, device: torch.device, seed: int, nm=None
) -> LinearSparseLowRank:
    """A compressed layer at the budget of (rho, kappa) or N:M: random mask, values and factors (speed only)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    budget = layer_budget(d_out, d_in, rho, kappa, nm)
    mask = sparsity_mask(torch.rand(d_out, d_in, device=device, generator=generator), budget.keep_per_row, nm)
    layer = LinearSparseLowRank(
        d_in, d_out, rank=budget.rank, nnz=budget.keep_per_row * d_out, bias=False, device=device, dtype=dtype
    )
    with torch.no_grad():
        layer.weight_mask.copy_(pack_bitmask(mask))
        for tensor in (layer.weight, layer.lowrank_u, layer.lowrank_v):
            tensor.normal_(0.0, 0.02, generator=generator)
    layer.requires_grad_(False)
    layer.set_execution_mode(BENCH_MODE)
    return layer


def random_quantized(args, d_out: int, d_in: int, dtype: torch.dtype, device: torch.device, seed: int):
    """A quantized layer at the shipped point (`--quant-rho`, `--quant-bits`-bit values, `--quant-lowrank-bits`-bit
    U V, groups of `--quant-group` columns): random mask, random codes, fixed scales; U V decoded from their codes
    (as a reloaded checkpoint holds them). Its values stay codes: every path decodes them where it reads them."""
    generator = torch.Generator(device=device).manual_seed(seed)
    budget = layer_budget(d_out, d_in, args.quant_rho, args.kappa, None)
    mask = sparsity_mask(torch.rand(d_out, d_in, device=device, generator=generator), budget.keep_per_row, None)
    storage = {"value_bits": args.quant_bits, "lowrank_bits": args.quant_lowrank_bits, "group_size": args.quant_group}
    layer = LinearSparseLowRank(
        d_in, d_out, rank=budget.rank, nnz=budget.keep_per_row * d_out, bias=False, device=device, dtype=dtype,
        **storage,
    )  # fmt: skip
    with torch.no_grad():
        layer.weight_mask.copy_(pack_bitmask(mask))
        for name in ("weight", "lowrank_u", "lowrank_v"):
            codes, scales = getattr(layer, f"{name}_codes", None), getattr(layer, f"{name}_scales", None)
            if codes is None:  # rank 0, or factors stored as floats
                continue
            codes.copy_(torch.randint(0, 256, codes.shape, device=device, generator=generator, dtype=torch.uint8))
            scales.copy_(torch.full(scales.shape, 0.004, device=device, dtype=torch.float16).view(torch.int16))
        layer.decode_()
    layer.requires_grad_(False)
    layer.set_execution_mode(BENCH_MODE)
    return layer


def random_dense(d_out: int, d_in: int, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Linear:
    linear = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(seed))
    return linear.requires_grad_(False)


def build_model(dims: dict, layers: int, dtype: torch.dtype, device: torch.device, seed: int):
    """A randomly initialised Llama model, built on `device` in `dtype` (no fp32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**dims, "num_hidden_layers": layers}, max_position_embeddings=4096)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def compress_randomly(model: nn.Module, rho: float, kappa: float, seed: int, quantized=None) -> int:
    """Replace every linear layer of the decoder blocks (dense or already compressed) by a random compressed one at
    the budget, or with `quantized` (the parsed arguments) by a random quantized one ([`random_quantized`]); returns
    how many were replaced."""
    count = 0
    for index, block in enumerate(model.model.layers):
        for name, module in list(block.named_modules()):
            if not isinstance(module, (nn.Linear, LinearSparseLowRank)):
                continue
            d_out, d_in = module.out_features, module.in_features
            reference = module.weight if isinstance(module, nn.Linear) else module.lowrank_u  # floats: the dtype
            layer_seed = seed + 1000 * index + count
            if quantized is not None:
                layer = random_quantized(quantized, d_out, d_in, reference.dtype, reference.device, layer_seed)
            else:
                layer = random_compressed(d_out, d_in, rho, kappa, reference.dtype, reference.device, layer_seed)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, layer)
            count += 1
    return count


def storage_bytes(module: nn.Module, kind: type) -> int:
    """Bytes of the parameters and buffers of every submodule of type `kind` (what the layers hold)."""
    return sum(
        t.numel() * t.element_size()
        for m in module.modules()
        if isinstance(m, kind)
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    )


# ---------------------------------------------------------------- timing


class Timer:
    """Seconds per call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, reps: int, inner: int, warmup: int = 2) -> None:
        self.device, self.reps, self.inner, self.warmup = device, reps, inner, warmup

    def _once(self, fn: Callable[[], object], inner: int) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        start_time = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - start_time) / inner

    def variants(self, variants: dict[str, Callable[[], object]], inner: int | None = None) -> dict[str, float]:
        """Median seconds per call of each variant; the order rotates every repetition (interleaved)."""
        inner = inner or self.inner
        names = list(variants)
        if not names:
            return {}
        for name in names:  # warm-up: Triton autotuning and compilation, cuBLAS heuristics, workspaces
            for _ in range(self.warmup):
                variants[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(self.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                samples[name].append(self._once(variants[name], inner))
        return {name: statistics.median(values) for name, values in samples.items()}


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], object] | None:
    """`fn` captured in a CUDA graph (replay removes Python and launch overhead), or None off CUDA / on failure."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up outside the capture (autotuning synchronises, which capture forbids)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception as err:  # report, do not abort the run
        print(f"CUDA graph capture failed: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def over_copies(fns: list[Callable[[], object]]) -> Callable[[], None]:
    def run() -> None:
        for fn in fns:
            fn()

    return run


# ---------------------------------------------------------------- sections


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected).norm() / expected.norm().clamp_min(1e-30))


def section_check(args, device, dtype, results) -> None:
    """The library's dispatch vs the dense reference on every shape, with the path each call took."""
    rows = []
    for name, (d_out, d_in) in args.shapes.items():
        layer = random_compressed(d_out, d_in, args.rho, args.kappa, dtype, device, seed=1)
        reference = layer.to_dense().float()
        for tokens in (1, 16, args.prefill[0]):
            x = torch.randn(tokens, d_in, device=device, dtype=dtype)
            with torch.no_grad():
                path, out = choose_path(layer, x), layer(x)
            error = _relative_error(out, x.float() @ reference.T)
            rows.append({"shape": name, "tokens": tokens, "path": path, "rel_error": error})
    # The shipped quantized point (codes decoded by the Triton kernels on CUDA): decode and prefill.
    quantized = random_quantized(args, *args.shapes["q/o"], dtype, device, seed=3)
    reference = quantized.to_dense().float()
    for tokens in (1, 16, args.prefill[0]):  # row reduction, tl.dot on the decoded tile, decompression
        x = torch.randn(tokens, quantized.in_features, device=device, dtype=dtype)
        with torch.no_grad():
            path, out = choose_path(quantized, x), quantized(x)
        error = _relative_error(out, x.float() @ reference.T)
        rows.append({"shape": f"q/o {args.quant_bits}-bit", "tokens": tokens, "path": path, "rel_error": error})
    nm_layer = random_compressed(*args.shapes["q/o"], args.rho, args.kappa, dtype, device, seed=2, nm=(2, 4))
    x = torch.randn(args.prefill[0], nm_layer.in_features, device=device, dtype=dtype)
    with torch.no_grad():
        path = choose_path(nm_layer, x)
        out = nm_layer(x)
    # The path of this very call: a cuSPARSELt failure falls back inside it, and is recorded, not relabelled.
    failed = device in gpu.semi_structured_failed
    rows.append(
        {
            "shape": "q/o 2:4",
            "tokens": args.prefill[0],
            "path": "triton_workspace (2:4 GEMM failed)" if path == "semi_structured" and failed else path,
            "rel_error": _relative_error(out, x.float() @ nm_layer.to_dense().float().T),
        }
    )
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    for row in rows:
        row["ok"] = row["rel_error"] < tolerance
    triton = gpu.triton_ready()
    # On CUDA every call must have taken a Triton path, else nothing GPU-specific was checked.
    paths = {row["path"].split(" ")[0] for row in rows}
    dispatched = device.type != "cuda" or (triton and paths <= set(dispatch.GPU_PATHS))
    results["check"] = {
        "triton_available": triton,
        "dispatched_to_triton": dispatched,
        "semi_structured_failed": failed,
        "rows": rows,
        "all_ok": dispatched and all(r["ok"] for r in rows),
    }
    print(f"\n### Correctness of the dispatch (relative error vs x (S + U V)^T, tolerance {tolerance})\n")
    print(f"Triton ready: {triton}; CUDA calls on Triton paths: {dispatched}; 2:4 GEMM failed: {failed}\n")
    print("| shape | tokens | path | relative error | ok |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['tokens']} | {row['path']} | {row['rel_error']:.2e} | {row['ok']} |")


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written (the memory roofline)."""
    source = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = Timer(device, reps=5, inner=5).variants({"copy": lambda t=target, s=source: t.copy_(s)})["copy"]
    return nbytes / seconds


def read_bytes(layer: LinearSparseLowRank) -> int:
    """Bytes a decode call reads from the layer: what the kernels take (values or codes + scales, mask, U, V, bias)
    plus the offset tables cached with the mask."""
    w = layer.packed()
    tensors = [t for t in w if isinstance(t, torch.Tensor)] + [w.value_offsets(), chunk_offsets(w.mask)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _decode_config(tokens: int, d_out: int, d_in: int, device: torch.device) -> str | None:
    """The decode kernel's autotuned configuration for the last launch, and its split-K."""
    kernels = gpu._triton_module()
    if kernels is None:
        return None
    best = getattr(kernels.decode_kernel, "best_config", None)
    if best is None:
        return None
    split = kernels.split_k_for(tokens, d_out, d_in, device)
    return (
        f"BLOCK_N={best.kwargs.get('BLOCK_N')} BLOCK_K={best.kwargs.get('BLOCK_K')} warps={best.num_warps} "
        f"stages={best.num_stages} split_k={split}"
    )


def section_layers(args, device, dtype, results) -> None:
    timer = Timer(device, args.reps, args.inner)
    rows = results["layers"] = []
    bandwidth = results.get("env", {}).get("copy_bytes_per_s") or copy_bandwidth(device, args.copy_bytes)
    triton = gpu.triton_ready() and (device.type == "cuda" or gpu._triton_module().INTERPRETED)
    # The interpreter (CPU rehearsal) runs each Triton call in seconds: one timed call, on the first shape only.
    interpreted = triton and device.type != "cuda"
    forced_timer = Timer(device, 1, 1, warmup=1) if interpreted else timer
    for index, (name, (d_out, d_in)) in enumerate(args.shapes.items()):
        forced = triton and not (interpreted and index)
        if time.perf_counter() - args.start > args.budget_s:
            results["errors"]["layers"] = f"stopped before {name}: time budget"
            break
        dense_bytes = d_out * d_in * dtype.itemsize
        copies = max(1, math.ceil(args.cold_bytes / dense_bytes))
        dense = [random_dense(d_out, d_in, dtype, device, seed) for seed in range(copies)]
        compressed = [
            random_compressed(d_out, d_in, args.rho, args.kappa, dtype, device, seed) for seed in range(copies)
        ]
        nm = [random_compressed(d_out, d_in, args.rho, args.kappa, dtype, device, s, nm=(2, 4)) for s in range(copies)]
        packed = [layer.packed() for layer in compressed]
        layer_bytes = read_bytes(compressed[0])
        # The quantized point: as many copies as walk the compressed layers' bytes (it is ~half their size).
        quantized = [random_quantized(args, d_out, d_in, dtype, device, seed=0)]
        quant_bytes = read_bytes(quantized[0])
        quant_copies = max(copies, math.ceil(copies * layer_bytes / quant_bytes))
        quantized += [random_quantized(args, d_out, d_in, dtype, device, seed) for seed in range(1, quant_copies)]
        divisor = {"quantized": quant_copies}  # every other variant walks `copies` layers
        decompress_us = None
        if forced:
            buffer = workspace(d_out, d_in, dtype, device)
            with torch.no_grad():
                seconds = forced_timer.variants(
                    {"d": over_copies([lambda w=w, b=buffer: gpu.triton_decompress(w, b) for w in packed])}
                )
            decompress_us = seconds["d"] / copies * 1e6
        for tokens in args.tokens:
            x = torch.randn(tokens, d_in, device=device, dtype=dtype)
            variants = {
                "dense": over_copies([lambda m=m, x=x: F.linear(x, m.weight) for m in dense]),
                "compressed": over_copies([lambda m=m, x=x: m(x) for m in compressed]),
                "quantized": over_copies([lambda m=m, x=x: m(x) for m in quantized]),
            }
            forced_variants = {}
            if forced and tokens <= args.max_forced_decode and tokens in args.forced_tokens:
                forced_variants["decode"] = over_copies(
                    [lambda w=w, x=x: gpu.run("triton_decode", w, x) for w in packed]
                )
            if forced and tokens in args.forced_tokens:
                forced_variants["workspace"] = over_copies(
                    [lambda w=w, x=x: gpu.run("triton_workspace", w, x) for w in packed]
                )
            if tokens in args.prefill:
                variants["2:4+lowrank"] = over_copies([lambda m=m, x=x: m(x) for m in nm])
            with torch.no_grad():
                path, quant_path = choose_path(compressed[0], x), choose_path(quantized[0], x)
                config = None
                if "decode" in forced_variants:
                    forced_variants["decode"]()  # autotunes for this shape; its choice is read right after
                    config = _decode_config(tokens, d_out, d_in, device)
                if interpreted:  # timed apart: seconds per call, not comparable with the rest
                    eager = {**timer.variants(variants), **forced_timer.variants(forced_variants)}
                else:
                    variants.update(forced_variants)
                    eager = timer.variants(variants)
                graphs = {k: graphed(v, device) for k, v in variants.items()}
                captured = {k: g for k, g in graphs.items() if g is not None}
                replay = timer.variants(captured, inner=max(1, args.inner // 4)) if captured else {}
            row = {
                "shape": name,
                "d_out": d_out,
                "d_in": d_in,
                "tokens": tokens,
                "copies": copies,
                "path": path,
                "path_quantized": quant_path,
                "copies_quantized": quant_copies,
                "decode_config": config,
                "bytes_ratio": layer_bytes / dense_bytes,
                "bytes_ratio_quantized": quant_bytes / dense_bytes,
                "decompress_us": decompress_us,
                **{f"eager_us_{k}": v / divisor.get(k, copies) * 1e6 for k, v in eager.items()},
                **{f"graph_us_{k}": v / divisor.get(k, copies) * 1e6 for k, v in replay.items()},
            }
            for kind in ("eager", "graph"):
                dense_us = row.get(f"{kind}_us_dense")
                for variant, suffix in (("compressed", ""), ("2:4+lowrank", "_24"), ("quantized", "_quantized")):
                    if dense_us is not None and row.get(f"{kind}_us_{variant}"):
                        row[f"{kind}_speedup{suffix}"] = dense_us / row[f"{kind}_us_{variant}"]
            best = row.get("graph_us_compressed") or row["eager_us_compressed"]
            row["compressed_GBps"] = layer_bytes / (best * 1e-6) / 1e9
            row["pct_of_copy"] = 100 * layer_bytes / (best * 1e-6) / bandwidth
            best = row.get("graph_us_quantized") or row["eager_us_quantized"]
            row["quantized_GBps"] = quant_bytes / (best * 1e-6) / 1e9
            rows.append(row)
            write_json(args.out, results)  # a row is kept even if a later one is killed
        del dense, compressed, nm, packed, quantized
        release_workspaces()
        _free(device)
    results["crossover"] = crossover(rows)
    print_layers(args, rows, bandwidth, results["crossover"])


def crossover(rows: list[dict]) -> dict:
    """Per shape, the most tokens at which the forced Triton decode path beats the forced workspace path (CUDA-graph
    times where captured): what `GPU_MAX_DECODE_TOKENS` should be (the smallest over the shapes)."""
    per_shape = {}
    for row in rows:
        kind = "graph" if "graph_us_decode" in row and "graph_us_workspace" in row else "eager"
        decode, ws = row.get(f"{kind}_us_decode"), row.get(f"{kind}_us_workspace")
        if decode is None or ws is None:
            continue
        entry = per_shape.setdefault(row["shape"], {"decode_wins_up_to": 0, "timing": kind})
        if decode < ws and entry["decode_wins_up_to"] == _previous_tokens(rows, row):
            entry["decode_wins_up_to"] = row["tokens"]
    wins = [entry["decode_wins_up_to"] for entry in per_shape.values()]
    return {
        "per_shape": per_shape,
        "current": dispatch.GPU_MAX_DECODE_TOKENS,
        "suggested_GPU_MAX_DECODE_TOKENS": min(wins) if wins else None,
    }


def _previous_tokens(rows: list[dict], row: dict) -> int:
    """The token count measured before `row` for its shape (0 for the first): decode must win without a gap."""
    counts = [r["tokens"] for r in rows if r["shape"] == row["shape"] and r["tokens"] < row["tokens"]]
    return max(counts, default=0)


def print_layers(args, rows: list[dict], bandwidth: float, cross: dict) -> None:
    print(
        f"\n### Per-layer time, rho={args.rho}, kappa={args.kappa}, {args.dtype}, cold L2 (us per call; speedup = "
        'dense / compressed; graph = CUDA-graph replay; path = what "auto" runs; quantized = rho '
        f"{args.quant_rho}, {args.quant_bits}-bit values, {args.quant_lowrank_bits}-bit U V, groups of "
        f"{args.quant_group})\n"
    )
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s\n")
    header = [
        "shape", "tokens", "path", "bytes vs dense", "dense", "compressed", "speedup", "graph dense",
        "graph compressed", "graph speedup", "GB/s (% copy)", "decode", "workspace", "2:4+LR speedup (graph)",
        "quantized path", "quantized bytes vs dense", "quantized (graph)", "quantized speedup (graph)",
    ]  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [
            f"{r['shape']} {r['d_out']}x{r['d_in']}",
            str(r["tokens"]),
            r["path"],
            f"{r['bytes_ratio']:.3f}",
            _fmt(r.get("eager_us_dense")),
            _fmt(r.get("eager_us_compressed")),
            _fmt(r.get("eager_speedup"), "x"),
            _fmt(r.get("graph_us_dense")),
            _fmt(r.get("graph_us_compressed")),
            _fmt(r.get("graph_speedup"), "x"),
            f"{r['compressed_GBps']:.3g} ({r['pct_of_copy']:.2g}%)",
            _fmt(r.get("graph_us_decode", r.get("eager_us_decode"))),
            _fmt(r.get("graph_us_workspace", r.get("eager_us_workspace"))),
            _fmt(r.get("graph_speedup_24", r.get("eager_speedup_24")), "x"),
            r.get("path_quantized", "-"),
            f"{r['bytes_ratio_quantized']:.3f}" if "bytes_ratio_quantized" in r else "-",
            _fmt(r.get("graph_us_quantized", r.get("eager_us_quantized"))),
            _fmt(r.get("graph_speedup_quantized", r.get("eager_speedup_quantized")), "x"),
        ]
        assert len(cells) == len(header)
        print("| " + " | ".join(cells) + " |")
    configs = {(r["shape"], r["tokens"]): r["decode_config"] for r in rows if r.get("decode_config")}
    decompress = {r["shape"]: r["decompress_us"] for r in rows if r.get("decompress_us") is not None}
    if decompress:
        print("\ndecompress only (us per layer): " + ", ".join(f"{k} {v:.1f}" for k, v in decompress.items()))
    if configs:
        print("\ndecode kernel configurations (autotuned):")
        for (shape, tokens), config in configs.items():
            print(f"- {shape} @ {tokens}: {config}")
    print(f"\ncrossover: {json.dumps(cross)}")


def _fmt(value, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}" if suffix else f"{value:.1f}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated(device)


def _generate_rate(model, args, device) -> dict[str, float]:
    vocab = model.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prompt), device=device, generator=generator)
    long_prompt = torch.randint(0, vocab, (1, args.prefill_model), device=device, generator=generator)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up: autotuning, compilation
        model(long_prompt, use_cache=False)
        _sync(device)
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kwargs)
        _sync(device)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        model(long_prompt, use_cache=False)
        _sync(device)
        prefill_s = time.perf_counter() - start
    new = out.shape[1] - prompt.shape[1]
    return {"tokens_per_s": new / generate_s, "generate_s": generate_s, "prefill_s": prefill_s, "new_tokens": new}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def section_model(args, device, dtype, results) -> None:
    _free(device)
    base = _allocated(device)
    start = time.perf_counter()
    model = build_model(args.dims, args.dims["num_hidden_layers"], dtype, device, seed=0)
    built_s = time.perf_counter() - start
    dense = {"allocated": _allocated(device), "linear_bytes": storage_bytes(model.model.layers, nn.Linear)}
    dense.update(_generate_rate(model, args, device))
    start = time.perf_counter()
    replaced = compress_randomly(model, args.rho, args.kappa, seed=0)
    _free(device)
    compressed = {
        "allocated": _allocated(device),
        "linear_bytes": storage_bytes(model.model.layers, LinearSparseLowRank),
        "replace_s": time.perf_counter() - start,
    }
    compressed.update(_generate_rate(model, args, device))
    compressed["allocated_after_prefill"] = _allocated(device)  # + one workspace per shape, no dense cache
    point = f"rho {args.quant_rho}, {args.quant_bits}-bit values, {args.quant_lowrank_bits}-bit U V"
    results["model"] = {
        "dense": dense, "compressed": compressed, "layers_replaced": replaced, "build_s": built_s,
        "quantized_point": point,
    }  # fmt: skip
    entries = [("dense", dense), ("compressed", compressed)]
    if time.perf_counter() - args.start < args.budget_s:  # the quantized model: the same blocks, codes as values
        release_workspaces()
        start = time.perf_counter()
        compress_randomly(model, args.rho, args.kappa, seed=0, quantized=args)
        _free(device)
        quantized = {
            "allocated": _allocated(device),
            "linear_bytes": storage_bytes(model.model.layers, LinearSparseLowRank),
            "replace_s": time.perf_counter() - start,
        }
        quantized.update(_generate_rate(model, args, device))
        quantized["allocated_after_prefill"] = _allocated(device)
        results["model"]["quantized"] = quantized
        entries.append(("quantized", quantized))
    else:
        results["model"]["quantized"] = None
        results["errors"]["model_quantized"] = "skipped: time budget"
    del model
    release_workspaces()
    _free(device)
    for _, entry in entries:
        for key in ("allocated", "allocated_after_prefill"):
            if entry.get(key) is not None:
                entry[key] -= base
    mb, unit = (1e3, "kB") if args.tiny else (1e6, "MB")
    layers = args.dims["num_hidden_layers"]
    print(f"\n### Whole model ({layers} layers, {args.dtype}, rho={args.rho}): memory and speed\n")
    print(f"| model | linear layers {unit} | GPU allocated {unit} | prefill ms | generate tokens/s |")
    print("|---|---|---|---|---|")
    for name, entry in entries:
        allocated = "-" if entry["allocated"] is None else f"{entry['allocated'] / mb:.0f}"
        print(
            f"| {name} | {entry['linear_bytes'] / mb:.0f} | {allocated} | {entry['prefill_s'] * 1e3:.1f} | "
            f"{entry['tokens_per_s']:.1f} |"
        )
    print(
        f"\nlayers: {compressed['linear_bytes'] / dense['linear_bytes']:.3f}x dense bytes; generation "
        f"{compressed['tokens_per_s'] / dense['tokens_per_s']:.2f}x dense; prefill of {args.prefill_model} tokens "
        f"{dense['prefill_s'] / compressed['prefill_s']:.2f}x dense speed"
    )
    if results["model"]["quantized"]:
        quantized = results["model"]["quantized"]
        print(
            f"quantized ({point}; resident bytes: codes, scales and the decoded U V): "
            f"{quantized['linear_bytes'] / dense['linear_bytes']:.3f}x dense bytes; generation "
            f"{quantized['tokens_per_s'] / dense['tokens_per_s']:.2f}x dense; prefill "
            f"{dense['prefill_s'] / quantized['prefill_s']:.2f}x dense speed"
        )


COMPRESS_ORDER = ("wanda", "sparsegpt", "oats", "hassle")  # cheapest first: a budget cut drops the slowest


def section_compress(args, device, dtype, results) -> None:
    from optimum_oats.engine.loop import compress_with_inputs

    rows = []
    results["compress"] = {
        "rows": rows,
        "iterations": args.oats_iterations,
        "svd": OATSSettings().solver,
        "calibration": [args.calib_samples, args.calib_seqlen],
    }
    generator = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(
        0, args.dims["vocab_size"], (args.calib_samples, args.calib_seqlen), generator=generator, device=device
    )
    previous = 0.0
    for method in COMPRESS_ORDER:
        left = args.budget_s - (time.perf_counter() - args.start)
        if left < previous:  # each method costs at least as much as the cheaper one before it
            rows.append({"method": method, "skipped": f"{left:.0f} s left, the previous method took {previous:.0f} s"})
            write_json(args.out, results)
            continue
        model = build_model(args.dims, args.compress_blocks, dtype, device, seed=0)
        config = OATSConfig(method=method, compression_rate=args.rho, num_iterations=args.oats_iterations)
        _sync(device)
        start = time.perf_counter()
        layer_map = compress_with_inputs(model, config, input_ids, progress=False)
        _sync(device)
        seconds = previous = time.perf_counter() - start
        errors = [entry["relative_error"] for entry in layer_map.values()]
        rows.append(
            {
                "method": method,
                "blocks": args.compress_blocks,
                "seconds": seconds,
                "seconds_per_block": seconds / args.compress_blocks,
                "layers": len(layer_map),
                "mean_relative_error": sum(errors) / max(1, len(errors)),
            }
        )
        write_json(args.out, results)  # each method's row as soon as it ends
        del model
        _free(device)
    print(
        f"\n### Compression wall time ({args.compress_blocks} blocks, calibration {args.calib_samples}x"
        f"{args.calib_seqlen} random tokens, OATS {args.oats_iterations} iterations, svd={OATSSettings().solver})\n"
    )
    print(compress_table(rows))


def compress_table(rows: list[dict]) -> str:
    lines = ["| method | seconds | seconds per block | mean relative error |", "|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['method']} | skipped ({row['skipped']}) | - | - |")
        else:
            lines.append(
                f"| {row['method']} | {row['seconds']:.1f} | {row['seconds_per_block']:.1f} | "
                f"{row['mean_relative_error']:.4f} |"
            )
    return "\n".join(lines)


def section_svd(args, device, dtype, results) -> None:
    """Seconds of one exact thin SVD and one Ritz step (the fast solver's per-iteration cost) in float32."""
    from optimum_oats.algorithms.oats import ritz_step, truncated_svd

    timer = Timer(device, reps=3, inner=1)
    rows = []
    for d_out, d_in in args.svd_shapes:
        matrix = torch.randn(d_out, d_in, device=device, dtype=torch.float32)
        rank = layer_budget(d_out, d_in, args.rho, args.kappa, None).rank
        basis = torch.randn(max(d_out, d_in), min(d_out, d_in, 2 * rank), device=device)
        with torch.no_grad():
            times = timer.variants(
                {
                    "exact": lambda m=matrix, r=rank: truncated_svd(m, r),
                    "ritz": lambda m=matrix, q=basis, r=rank: ritz_step(m, q, r),
                }
            )
        rows.append({"shape": [d_out, d_in], "rank": rank, "exact_s": times["exact"], "ritz_s": times["ritz"]})
    results["svd"] = rows
    print("\n### SVD timing probe (float32)\n\n| shape | rank | exact thin SVD s | Ritz step s |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape'][0]}x{row['shape'][1]} | {row['rank']} | {row['exact_s']:.3f} | {row['ritz_s']:.4f} |")


def section_env(args, device, dtype, results) -> None:
    """Versions, GPU, clocks, cuSPARSELt, and the copy bandwidth the per-layer GB/s are compared with."""
    env = results["env"] = environment(device)
    env["cusparselt"] = _cusparselt()
    env["clocks"] = _nvidia_smi("clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu")
    env["copy_bytes_per_s"] = copy_bandwidth(device, args.copy_bytes)
    print(f"\n### Environment\n\n{json.dumps(env)}")


def _cusparselt() -> dict:
    backend = getattr(torch.backends, "cusparselt", None)
    try:
        available = bool(backend and backend.is_available())
        return {"available": available, "version": backend.version() if available else None}
    except Exception as err:  # report, never fail on a probe
        return {"available": False, "error": f"{type(err).__name__}: {err}"}


def _nvidia_smi(fields: str) -> str | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(
        ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
    )
    return result.stdout.strip() or result.stderr.strip()


SECTIONS = {
    "env": section_env,
    "check": section_check,
    "layers": section_layers,
    "model": section_model,
    "svd": section_svd,
    "compress": section_compress,
}


# ---------------------------------------------------------------- main


def environment(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": os.getloadavg()[0],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import transformers

    info["transformers"] = transformers.__version__
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, capability=list(torch.cuda.get_device_capability(device)), memory=props.total_memory
        )
    return info


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_cell(path, data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, tokens, blocks and iterations")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and model (CPU smoke test)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--kappa", type=float, default=OATSConfig().rank_ratio)
    # The quantized column: the shipped point (README: hassle rho 0.3, 4-bit values, 8-bit U V, groups of 128).
    parser.add_argument("--quant-rho", type=float, default=0.3)
    parser.add_argument("--quant-bits", type=int, default=4, choices=[3, 4, 6, 8])
    parser.add_argument("--quant-lowrank-bits", type=int, default=8, choices=[4, 8, 16])
    parser.add_argument("--quant-group", type=int, default=DEFAULT_GROUP_SIZE)
    parser.add_argument("--out", type=Path, default=Path("gpu_results.json"))
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip what would start after this many seconds")
    parser.add_argument("--cold-bytes", type=float, default=256e6, help="bytes walked per timed pass (> 2x L2)")
    args = parser.parse_args(argv)
    args.dims = TINY if args.tiny else LLAMA3_8B
    args.shapes = llama_block_shapes(args.dims)
    args.tokens = [1, 4, 16, 32, 64] if args.tiny else ([1, 16, 64, 512] if args.quick else TOKENS)
    args.prefill = [t for t in args.tokens if t > 16][-2:]  # 2:4 + low rank is timed at these
    args.max_forced_decode = 64 if args.tiny else 512  # the forced Triton decode path is timed up to here
    args.forced_tokens = [1, 32] if args.tiny else args.tokens  # the interpreter takes seconds per Triton call
    args.svd_shapes = [(64, 64), (160, 64)] if args.tiny else [(4096, 4096), (14336, 4096)]
    args.copy_bytes = 8 << 20 if args.tiny else 1 << 30
    args.reps, args.inner = (3, 3) if args.quick or args.tiny else (7, 10)
    args.prompt, args.new_tokens = (8, 8) if args.tiny else (16, 16 if args.quick else 64)
    args.prefill_model = 32 if args.tiny else 512
    args.compress_blocks = 1 if args.quick or args.tiny else 2
    args.oats_iterations = 5 if args.tiny else (20 if args.quick else OATSSettings().num_iterations)
    args.calib_samples, args.calib_seqlen = (2, 16) if args.tiny else ((4, 512) if args.quick else (8, 512))
    if args.tiny:
        args.cold_bytes = 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    provenance = Provenance.start("triton")
    args.start = time.perf_counter()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: pass `--device cpu --tiny` for the CPU rehearsal.")
    results: dict = {"args": _jsonable(vars(args)), "errors": {}}
    print(f"# GPU benchmark on {device}, sections {args.sections}, budget {args.budget_s:.0f} s")
    for name in args.sections:
        elapsed = time.perf_counter() - args.start
        if elapsed > args.budget_s and name != "env":
            results["errors"][name] = f"skipped: {elapsed:.0f} s spent of the {args.budget_s:.0f} s budget"
            print(f"\n{name}: {results['errors'][name]}")
            continue
        start = time.perf_counter()
        try:
            SECTIONS[name](args, device, dtype, results)
        except Exception as err:  # one failing section must not lose the others' numbers
            results["errors"][name] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        results.setdefault("section_seconds", {})[name] = time.perf_counter() - start
        release_workspaces()
        _free(device)
        write_json(args.out, results)
    results["total_seconds"] = time.perf_counter() - args.start
    write_json(args.out, results)
    text = summary(results)
    summary_path = args.out.with_suffix(".summary.md")
    summary_path.write_text(text)
    print(f"\ntotal {results['total_seconds']:.0f} s; JSON: {args.out}; summary: {summary_path}")
    print(provenance.line())
    print(text)  # last: what the device tool returns
    return 1 if results["errors"] or not results.get("check", {}).get("all_ok", True) else 0


def _model_line(label: str, comp: dict, dense: dict) -> str:
    """One summary line of a compressed model's run against the dense one's: bytes, memory, decode, prefill."""
    both = dense.get("allocated") and comp.get("allocated")
    memory = f"{comp['allocated'] / dense['allocated']:.3f}x" if both else "-"
    return (
        f"{label}: linear bytes {comp['linear_bytes'] / dense['linear_bytes']:.3f}x, GPU memory {memory}, "
        f"decode {comp['tokens_per_s']:.1f} vs {dense['tokens_per_s']:.1f} tokens/s "
        f"({comp['tokens_per_s'] / dense['tokens_per_s']:.2f}x), "
        f"prefill {dense['prefill_s'] / comp['prefill_s']:.2f}x"
    )


def summary(results: dict) -> str:
    """Every decisive number in under `SUMMARY_LIMIT` characters, ending with an END line."""
    env = results.get("env", {})
    lines = ["", "=== SUMMARY (benchmarks/gpu.py) ==="]
    keys = ("gpu", "capability", "torch", "triton", "cusparselt", "clocks", "load_average")
    lines.append("env: " + json.dumps({k: env.get(k) for k in keys}))
    if env.get("copy_bytes_per_s"):
        lines.append(f"copy bandwidth: {env['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write)")
    check = results.get("check")
    if check:
        bad = [f"{r['shape']}@{r['tokens']}:{r['rel_error']:.1e}" for r in check["rows"] if not r["ok"]]
        paths = sorted({f"{r['shape']}@{r['tokens']}={r['path']}" for r in check["rows"]})
        lines.append(f"check: all_ok={check['all_ok']} triton={check['dispatched_to_triton']} bad={bad}")
        lines.append("check paths: " + ", ".join(paths))
    layers = results.get("layers") or []
    if layers:
        lines.append("layers (us; speedup = dense/compressed, graph where captured):")
        lines.append(
            "shape tokens path | dense comp speedup | decode workspace | GB/s %copy | decomp | quantized: us speedup "
            "bytes | config"
        )
        for r in layers:
            kind = "graph" if "graph_us_compressed" in r else "eager"
            quant = (
                f"{_fmt(r.get(kind + '_us_quantized'))} {_fmt(r.get(kind + '_speedup_quantized'), 'x')} "
                f"{r.get('bytes_ratio_quantized', 0):.2f}"
            )
            lines.append(
                f"{r['shape']} {r['tokens']} {r['path']} | {_fmt(r.get(kind + '_us_dense'))} "
                f"{_fmt(r.get(kind + '_us_compressed'))} {_fmt(r.get(kind + '_speedup'), 'x')} | "
                f"{_fmt(r.get(kind + '_us_decode'))} {_fmt(r.get(kind + '_us_workspace'))} | "
                f"{r['compressed_GBps']:.3g} {r['pct_of_copy']:.2g}% | {_fmt(r.get('decompress_us'))} | {quant} | "
                f"{(r.get('decode_config') or '-')[:60]}"
            )
    if "crossover" in results:
        lines.append("crossover: " + json.dumps(results["crossover"]))
    model = results.get("model")
    if model:
        lines.append(_model_line("model", model["compressed"], model["dense"]))
        if model.get("quantized"):
            label = f"model quantized ({model.get('quantized_point')})"
            lines.append(_model_line(label, model["quantized"], model["dense"]))
    for row in results.get("svd") or []:
        lines.append(
            f"svd {row['shape']} rank {row['rank']}: exact {row['exact_s']:.3f} s, ritz {row['ritz_s']:.4f} s"
        )
    compress = results.get("compress")
    if compress:
        lines.append(compress_table(compress["rows"]))
    lines.append(f"sections s: {json.dumps({k: round(v, 1) for k, v in results.get('section_seconds', {}).items()})}")
    lines.append(f"errors: {json.dumps(results['errors']) if results['errors'] else 'none'}")
    text = "\n".join(lines)
    end = "\n=== END SUMMARY ==="
    if len(text) + len(end) > SUMMARY_LIMIT:
        text = text[: SUMMARY_LIMIT - len(end) - 20] + "\n[... truncated]"
    return text + end


def _jsonable(values: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k != "start"}


if __name__ == "__main__":
    sys.exit(main())
