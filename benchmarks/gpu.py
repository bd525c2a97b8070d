"""GPU speed and memory of compressed layers and models (issue 16, item 4), in one short run; markdown tables + JSON.

    python benchmarks/gpu.py                       # one H100/H200: Llama-3-8B shapes, bf16, rho 0.5 (<= 8 min)
    python benchmarks/gpu.py --quick               # fewer repetitions, tokens and blocks
    python benchmarks/gpu.py --device cpu --tiny   # a tiny configuration on the CPU (the CI smoke test)

Nothing is downloaded: models are built from a `LlamaConfig` with random weights, which is fine for speed and
memory. Compressed layers for the speed parts are built directly at the budget of rho = 0.5 and the default
kappa (`OATSConfig().rank_ratio`): a random row-wise mask of `keep_per_row` entries, random values and random
U, V of the budget's rank (compressing random 4096x14336 matrices with 80 OATS iterations would take most of the
run). Compression time is measured separately, on a few real blocks, with each method.

Sections, each timed against the `--budget-s` wall-clock limit and written to the JSON as soon as it ends:

- `check`: the compiled Triton kernels against `x (S + U V)^T` (decode at 1 and 16 tokens, prefill, a 2:4 layer);
- `layers`: per-layer time at 1/4/16 tokens (decode) and 512/2048 (prefill) vs dense `nn.Linear`, eager and
  replayed from a CUDA graph (launch overhead removed); every timed pass walks over enough copies of the layer to
  exceed the L2 cache (`--cold-bytes`), as in a model where the weights of one layer are evicted before the next
  token needs them; plus 2:4 + low rank at prefill;
- `model`: a randomly initialised Llama-3-8B-shaped model in bf16: GPU memory of the loaded model, prefill of
  a 512-token prompt and greedy generation tokens/s, dense vs compressed;
- `compress`: wall time to compress `--compress-blocks` blocks with OATS, SparseGPT and Wanda (random
  calibration token ids).

Timing: CUDA events around `--inner` calls, median of `--reps` repetitions, variants interleaved; on the CPU
`time.perf_counter`. The compressed layers run in the library's default execution mode "auto", which on CUDA calls
`optimum_oats.kernels.gpu.layer_forward` (Triton decode, workspace or 2:4 prefill) and elsewhere the CPU paths
(the CPU smoke test); the `check` section records the mode each call took and fails if CUDA did not use Triton.
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
from torch import nn

from optimum_oats.algorithms import OATSSettings
from optimum_oats.algorithms.budget import layer_budget
from optimum_oats.algorithms.masks import sparsity_mask
from optimum_oats.config import OATSConfig
from optimum_oats.kernels import gpu
from optimum_oats.nn import LinearSparseLowRank, pack_bitmask
from optimum_oats.nn.kernel_execution import choose_mode

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


def random_dense(d_out: int, d_in: int, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Linear:
    linear = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=torch.Generator(device=device).manual_seed(seed))
    return linear.requires_grad_(False)


def layer_shapes(dims: dict) -> dict[str, tuple[int, int]]:
    hidden, inter = dims["hidden_size"], dims["intermediate_size"]
    kv = dims["num_key_value_heads"] * hidden // dims["num_attention_heads"]
    return {"q/o": (hidden, hidden), "k/v": (kv, hidden), "gate/up": (inter, hidden), "down": (hidden, inter)}


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


def compress_randomly(model: nn.Module, rho: float, kappa: float, seed: int) -> int:
    """Replace every linear layer of the decoder blocks by a random compressed one at the budget; returns count."""
    count = 0
    for index, block in enumerate(model.model.layers):
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                d_out, d_in = module.weight.shape
                layer = random_compressed(
                    d_out, d_in, rho, kappa, module.weight.dtype, module.weight.device, seed + 1000 * index + count
                )
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

    def __init__(self, device: torch.device, reps: int, inner: int) -> None:
        self.device, self.reps, self.inner = device, reps, inner

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
        for name in names:  # warm-up: Triton autotuning and compilation, cuBLAS heuristics, workspaces
            variants[name]()
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
    """Compiled kernels vs the dense reference on every shape (the GPU path has no other test than this)."""
    rows = []
    for name, (d_out, d_in) in args.shapes.items():
        layer = random_compressed(d_out, d_in, args.rho, args.kappa, dtype, device, seed=1)
        reference = layer.to_dense().float()
        for tokens in (1, 16, args.prefill[0]):
            x = torch.randn(tokens, d_in, device=device, dtype=dtype)
            with torch.no_grad():
                out, mode = layer(x), choose_mode(layer, x)
            error = _relative_error(out, x.float() @ reference.T)
            rows.append({"shape": name, "tokens": tokens, "mode": mode, "rel_error": error})
    nm_layer = random_compressed(*args.shapes["q/o"], args.rho, args.kappa, dtype, device, seed=2, nm=(2, 4))
    x = torch.randn(args.prefill[0], nm_layer.in_features, device=device, dtype=dtype)
    with torch.no_grad():
        out = nm_layer(x)
    path = gpu.choose_gpu_path(
        args.prefill[0],
        device=device,
        dtype=dtype,
        out_features=nm_layer.out_features,
        in_features=nm_layer.in_features,
        two_four=gpu.layer_two_four(nm_layer),
    )
    rows.append(
        {
            "shape": "q/o 2:4",
            "tokens": args.prefill[0],
            "path": path,
            "rel_error": _relative_error(out, x.float() @ nm_layer.to_dense().float().T),
        }
    )
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    for row in rows:
        row["ok"] = row["rel_error"] < tolerance
    triton = gpu.triton_available(x)
    # On CUDA the "auto" dispatch must have taken the Triton path ("sparse_kernel"), else nothing was checked.
    modes = {row["mode"] for row in rows if "mode" in row}
    dispatched = device.type != "cuda" or (triton and modes == {"sparse_kernel"})
    results["check"] = {
        "triton_available": triton,
        "dispatched_to_triton": dispatched,
        "rows": rows,
        "all_ok": dispatched and all(r["ok"] for r in rows),
    }
    print(f"\n### Correctness of the GPU path (relative error vs x (S + U V)^T, tolerance {tolerance})\n")
    print(f'Triton available: {triton}; CUDA calls dispatched to it by "auto": {dispatched}\n')
    print("| shape | tokens | mode | relative error | ok |\n|---|---|---|---|---|")
    for row in rows:
        mode = row.get("mode", row.get("path"))
        print(f"| {row['shape']} | {row['tokens']} | {mode} | {row['rel_error']:.2e} | {row['ok']} |")


def section_layers(args, device, dtype, results) -> None:
    timer = Timer(device, args.reps, args.inner)
    rows = []
    for name, (d_out, d_in) in args.shapes.items():
        dense_bytes = d_out * d_in * dtype.itemsize
        copies = max(1, math.ceil(args.cold_bytes / dense_bytes))
        dense = [random_dense(d_out, d_in, dtype, device, seed) for seed in range(copies)]
        compressed = [
            random_compressed(d_out, d_in, args.rho, args.kappa, dtype, device, seed) for seed in range(copies)
        ]
        nm = [random_compressed(d_out, d_in, args.rho, args.kappa, dtype, device, s, nm=(2, 4)) for s in range(copies)]
        ratio_bytes = storage_bytes(compressed[0], LinearSparseLowRank) / dense_bytes
        for tokens in [*args.decode, *args.prefill]:
            x = torch.randn(tokens, d_in, device=device, dtype=dtype)
            variants = {
                "dense": over_copies([lambda m=m, x=x: F.linear(x, m.weight) for m in dense]),
                "compressed": over_copies([lambda m=m, x=x: m(x) for m in compressed]),
            }
            if tokens in args.prefill:
                variants["2:4+lowrank"] = over_copies([lambda m=m, x=x: m(x) for m in nm])
            with torch.no_grad():
                eager = timer.variants(variants)
                graphs = {k: graphed(v, device) for k, v in variants.items()}
                captured = {k: g for k, g in graphs.items() if g is not None}
                both = "dense" in captured and "compressed" in captured
                replay = timer.variants(captured, inner=max(1, args.inner // 4)) if both else {}
            row = {
                "shape": name,
                "d_out": d_out,
                "d_in": d_in,
                "tokens": tokens,
                "copies": copies,
                "bytes_ratio": ratio_bytes,
                **{f"eager_us_{k}": v / copies * 1e6 for k, v in eager.items()},
                **{f"graph_us_{k}": v / copies * 1e6 for k, v in replay.items()},
            }
            for kind, times in (("eager", eager), ("graph", replay)):
                if times:
                    row[f"{kind}_speedup"] = times["dense"] / times["compressed"]
                    if "2:4+lowrank" in times:
                        row[f"{kind}_speedup_24"] = times["dense"] / times["2:4+lowrank"]
            rows.append(row)
        del dense, compressed, nm
        gpu.clear_workspaces()
        _free(device)
    results["layers"] = rows
    print(
        f"\n### Per-layer time, rho={args.rho}, kappa={args.kappa}, {args.dtype}, cold L2 (us per call; speedup = "
        "dense / compressed; graph = CUDA-graph replay)\n"
    )
    print(
        "| shape | tokens | bytes vs dense | dense | compressed | speedup | graph dense | graph compressed | graph "
        "speedup | 2:4+LR speedup (graph) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} {r['d_out']}x{r['d_in']} | {r['tokens']} | {r['bytes_ratio']:.3f} | "
            f"{r['eager_us_dense']:.1f} | {r['eager_us_compressed']:.1f} | {r['eager_speedup']:.2f}x | "
            f"{_fmt(r.get('graph_us_dense'))} | {_fmt(r.get('graph_us_compressed'))} | "
            f"{_fmt(r.get('graph_speedup'), 'x')} | {_fmt(r.get('eager_speedup_24'), 'x')} | "
            f"{_fmt(r.get('graph_speedup_24'), 'x')} |"
        )


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
    del model
    gpu.clear_workspaces()
    _free(device)
    for entry in (dense, compressed):
        for key in ("allocated", "allocated_after_prefill"):
            if entry.get(key) is not None:
                entry[key] -= base
    results["model"] = {"dense": dense, "compressed": compressed, "layers_replaced": replaced, "build_s": built_s}
    mb, unit = (1e3, "kB") if args.tiny else (1e6, "MB")
    layers = args.dims["num_hidden_layers"]
    print(f"\n### Whole model ({layers} layers, {args.dtype}, rho={args.rho}): memory and speed\n")
    print(f"| model | linear layers {unit} | GPU allocated {unit} | prefill ms | generate tokens/s |")
    print("|---|---|---|---|---|")
    for name, entry in (("dense", dense), ("compressed", compressed)):
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


def section_compress(args, device, dtype, results) -> None:
    from optimum_oats.engine.loop import compress_with_inputs

    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(
        0, args.dims["vocab_size"], (args.calib_samples, args.calib_seqlen), generator=generator, device=device
    )
    for method in ("oats", "hassle", "sparsegpt", "wanda"):
        if time.perf_counter() - args.start > args.budget_s:
            rows.append({"method": method, "skipped": "time budget"})
            continue
        model = build_model(args.dims, args.compress_blocks, dtype, device, seed=0)
        config = OATSConfig(method=method, compression_rate=args.rho, num_iterations=args.oats_iterations)
        _sync(device)
        start = time.perf_counter()
        layer_map = compress_with_inputs(model, config, input_ids, progress=False)
        _sync(device)
        seconds = time.perf_counter() - start
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
        del model
        _free(device)
    results["compress"] = {
        "rows": rows,
        "iterations": args.oats_iterations,
        "svd": OATSSettings().solver,
        "calibration": [args.calib_samples, args.calib_seqlen],
    }
    print(
        f"\n### Compression wall time ({args.compress_blocks} blocks, calibration {args.calib_samples}x"
        f"{args.calib_seqlen} random tokens, OATS {args.oats_iterations} iterations, svd={OATSSettings().solver})\n"
    )
    print("| method | seconds | seconds per block | mean relative error |\n|---|---|---|---|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['method']} | skipped ({row['skipped']}) | | |")
        else:
            print(
                f"| {row['method']} | {row['seconds']:.1f} | {row['seconds_per_block']:.1f} | "
                f"{row['mean_relative_error']:.4f} |"
            )


SECTIONS = {"check": section_check, "layers": section_layers, "model": section_model, "compress": section_compress}


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
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, capability=list(torch.cuda.get_device_capability(device)), memory=props.total_memory
        )
    return info


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, tokens, blocks and iterations")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and model (CPU smoke test)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--kappa", type=float, default=OATSConfig().rank_ratio)
    parser.add_argument("--out", type=Path, default=Path("gpu_results.json"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this many seconds")
    parser.add_argument("--cold-bytes", type=float, default=256e6, help="bytes walked per timed pass (> 2x L2)")
    args = parser.parse_args(argv)
    args.dims = TINY if args.tiny else LLAMA3_8B
    args.shapes = layer_shapes(args.dims)
    args.decode = [1, 4, 16]
    args.prefill = [32, 64] if args.tiny else ([512] if args.quick else [512, 2048])
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
    args.start = time.perf_counter()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: pass `--device cpu --tiny` for the CPU smoke test.")
    results: dict = {"environment": environment(device), "args": _jsonable(vars(args)), "errors": {}}
    print(f"# GPU benchmark on {results['environment'].get('gpu', device)}: {results['environment']}")
    for name in args.sections:
        elapsed = time.perf_counter() - args.start
        if elapsed > args.budget_s:
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
        gpu.clear_workspaces()
        _free(device)
        write_json(args.out, results)
    results["total_seconds"] = time.perf_counter() - args.start
    write_json(args.out, results)
    print(f"\ntotal {results['total_seconds']:.0f} s; errors: {results['errors'] or 'none'}; JSON: {args.out}")
    return 1 if results["errors"] or not results.get("check", {}).get("all_ok", True) else 0


def _jsonable(values: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k != "start"}


if __name__ == "__main__":
    sys.exit(main())
