"""Inference speed and memory of compressed layers and models on the CPU (issue 7), printed as markdown tables.

Sections (run one or several; each is a function registered in SECTIONS, so more can be added):

    python benchmarks/speed.py --section floor              # bytes each storage format reads per forward
    python benchmarks/speed.py --section layers             # per-layer forward time, SmolLM2 shapes, every mode
    python benchmarks/speed.py --section generate           # end-to-end greedy generation tokens/s
    python benchmarks/speed.py --section memory             # peak resident memory, dense vs compressed

Timing rules: `torch.set_num_threads(--threads)` (default 1: the machine may be shared), the variants of one
measurement are interleaved in a rotating order within every repetition, and ratios are ratios of medians.

`layers` uses layers built like real ones at rho=0.5, kappa=0.25 (Wanda-style row-wise top-k mask of a random
weight scaled by random input norms, the budget rule's rank and nnz). With `--cache cold` (default) every timed
pass walks over enough distinct copies of the layer to exceed the last-level cache, as in a real model where
each layer's weights are evicted before the next token needs them; `--cache hot` reuses one layer (weights stay
in L2/L3), the best case for dense.

`generate` and `memory` use a compressed SmolLM2-135M: OATS with the fast solver and a tiny calibration (speed and
memory do not depend on compression quality), saved once to `--checkpoint` and reused.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from toolkit.data import data_root
from toolkit.models import llama_block_shapes, smollm2_path
from toolkit.provenance import Provenance
from torch import nn

from optimum_oats.algorithms.budget import layer_budget
from optimum_oats.algorithms.pruning import wanda_prune
from optimum_oats.kernels import kernel_available
from optimum_oats.nn import LinearSparseLowRank

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES = ("decompress", "merged", "sparse_kernel", "auto")
COLD_BYTES = 96e6  # > 2x a 32 MB L3: every pass reads the weights from DRAM


def smollm2_shapes(model_path: Path) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each distinct linear layer of a Llama-style block, from config.json."""
    return llama_block_shapes(json.loads((model_path / "config.json").read_text()))


# ---------------------------------------------------------------- floor


def format_bytes(d_out: int, d_in: int, rho: float, kappa: float, dtype_bytes: int) -> dict[str, float]:
    """Bytes one forward pass must read for each storage format (weights only; activations are tiny at decode)."""
    budget = layer_budget(d_out, d_in, rho, kappa)
    nnz, lowrank = budget.keep_per_row * d_out, budget.rank * (d_out + d_in) * dtype_bytes
    return {
        "dense": d_out * d_in * dtype_bytes,
        "bitmask": nnz * dtype_bytes + d_out * ((d_in + 7) // 8) + lowrank + 8 * (d_out + 1),
        "csr-u16": nnz * (dtype_bytes + 2) + 8 * (d_out + 1) + lowrank,
        "csr-i32": nnz * (dtype_bytes + 4) + 8 * (d_out + 1) + lowrank,
    }


def section_floor(args: argparse.Namespace) -> None:
    shapes = smollm2_shapes(args.model)
    print(
        f"\n### Bytes read per forward at rho={args.rho}, kappa={args.kappa} (weights, MB; floor speedup vs dense)\n"
    )
    print("| shape | dtype | dense | bitmask + values (used) | CSR uint16 idx | CSR int32 idx |")
    print("|---|---|---|---|---|---|")
    for name, (d_out, d_in) in shapes.items():
        for dtype_name, dtype in DTYPES.items():
            sizes = format_bytes(d_out, d_in, args.rho, args.kappa, dtype.itemsize)
            cells = [
                f"{sizes[k] / 1e6:.3f} ({sizes['dense'] / sizes[k]:.2f}x)" for k in ("bitmask", "csr-u16", "csr-i32")
            ]
            print(f"| {name} {d_out}x{d_in} | {dtype_name} | {sizes['dense'] / 1e6:.3f} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------- layers


def compressed_layer(d_out: int, d_in: int, rho: float, kappa: float, dtype: torch.dtype, seed: int):
    """A dense `nn.Linear` and its compressed replacement with a Wanda-style mask and the budget's rank."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(d_out, d_in, generator=generator) * 0.02)
    norms = torch.rand(d_in, generator=generator) + 0.5
    budget = layer_budget(d_out, d_in, rho, kappa)
    sparse = wanda_prune(linear.weight.detach(), norms, keep_per_row=budget.keep_per_row)
    u = torch.randn(d_out, budget.rank, generator=generator) * 0.02
    v = torch.randn(budget.rank, d_in, generator=generator) * 0.02
    return linear.to(dtype), LinearSparseLowRank.from_linear(linear.to(dtype), sparse, u, v)


def time_variants(variants: dict[str, Callable[[], None]], reps: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each variant; the order rotates every repetition (interleaved)."""
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up: caches built (merged), kernel loaded, pages touched
        variants[name]()
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            for _ in range(inner):
                variants[name]()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def section_layers(args: argparse.Namespace) -> None:
    shapes = smollm2_shapes(args.model)
    print(
        f"\n### Per-layer forward time, rho={args.rho}, kappa={args.kappa}, threads={torch.get_num_threads()}, "
        f"cache={args.cache}, median of {args.reps} interleaved repetitions (us per layer call)\n"
    )
    print("| shape | dtype | tokens | dense nn.Linear | " + " | ".join(args.modes) + " | best mode | auto speedup |")
    print("|---|---|---|---|" + "---|" * len(args.modes) + "---|---|")
    speedups: dict[tuple[str, int], list[float]] = {}
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for name, (d_out, d_in) in shapes.items():
            copies = 1 if args.cache == "hot" else max(1, int(COLD_BYTES // (d_out * d_in * dtype.itemsize)))
            pairs = [compressed_layer(d_out, d_in, args.rho, args.kappa, dtype, seed) for seed in range(copies)]
            for tokens in args.tokens:
                x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(tokens)).to(dtype)
                variants = {"dense": _dense_runner([dense for dense, _ in pairs], x)}
                for mode in args.modes:
                    variants[mode] = _mode_runner([layer for _, layer in pairs], mode, x)
                with torch.no_grad():
                    inner = max(1, int(args.min_pass_s // _estimate(variants["dense"])))
                    times = time_variants(variants, args.reps, inner)
                times = {k: v / copies for k, v in times.items()}
                ratios = {mode: times["dense"] / times[mode] for mode in args.modes}
                best = max(ratios, key=ratios.get)
                speedups.setdefault((dtype_name, tokens), []).append(ratios.get("auto", ratios[best]))
                auto_cell = f"{ratios['auto']:.2f}x" if "auto" in ratios else "-"
                cells = " | ".join(f"{times[m] * 1e6:.1f} ({ratios[m]:.2f}x)" for m in args.modes)
                print(
                    f"| {name} {d_out}x{d_in} | {dtype_name} | {tokens} | {times['dense'] * 1e6:.1f} | {cells} | "
                    f"{best} {ratios[best]:.2f}x | {auto_cell} |",
                    flush=True,
                )
                del variants
            del pairs
    print("\nMedian over the layer shapes of dense time / auto time:\n")
    print("| dtype | tokens | median speedup (auto vs dense, else the best mode) |")
    print("|---|---|---|")
    for (dtype_name, tokens), values in speedups.items():
        print(f"| {dtype_name} | {tokens} | {statistics.median(values):.2f}x |")


def _dense_runner(linears: list[nn.Linear], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for linear in linears:
            linear(x)

    return run


def _mode_runner(layers: list[LinearSparseLowRank], mode: str, x: torch.Tensor) -> Callable[[], None]:
    for layer in layers:
        layer.set_execution_mode(mode)

    def run() -> None:
        for layer in layers:
            layer.execution_mode = mode  # the layers are shared by several modes; keep any merged cache
            layer(x)

    return run


def _estimate(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-6)


# ---------------------------------------------------------------- generate / memory


def compressed_checkpoint(args: argparse.Namespace, value_bits: int = 16, embedding_bits: int = 16) -> Path:
    """A compressed SmolLM2 saved once (fast OATS solver, tiny calibration: speed does not depend on quality); with
    `value_bits` below 16, its values quantized to that many bits and U, V to 8 (the ≈ 4-bit checkpoint's storage);
    with `embedding_bits=8`, the tied embedding / LM head as int8 rows."""
    suffix = (f"-v{value_bits}" if value_bits < 16 else "") + (f"-e{embedding_bits}" if embedding_bits < 16 else "")
    folder = args.checkpoint.with_name(f"{args.checkpoint.name}{suffix}")
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_oats import OATSConfig, compress

    data_dir = data_root()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = OATSConfig(
        compression_rate=args.rho,
        rank_ratio=args.kappa,
        method="oats",
        svd="fast",
        num_iterations=2,
        num_samples=4,
        seqlen=256,
        dataset=str(data_dir / "c4" / "c4_sample.jsonl"),
        **({"value_bits": value_bits, "lowrank_bits": 8} if value_bits < 16 else {}),
        embedding_bits=embedding_bits,
    )
    start = time.perf_counter()
    compress(model, config, tokenizer)
    print(f"compressed SmolLM2 in {time.perf_counter() - start:.0f} s -> {folder}", file=sys.stderr)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _load(path: Path, dtype: torch.dtype, mode: str | None):
    from transformers import AutoModelForCausalLM

    import optimum_oats  # noqa: F401  (registers the "oats" quantization method)
    from optimum_oats.nn import set_execution_mode

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if mode is not None:
        set_execution_mode(model, mode)
    return model


def _prompt(tokenizer, tokens: int | None):
    """The short default prompt, or the first `tokens` tokens of WikiText-2's test split (a long chat-like prompt)."""
    if not tokens:
        return tokenizer("The capital of France is", return_tensors="pt")
    from optimum_oats.evaluation import wikitext2_text

    ids = tokenizer(wikitext2_text()[:200_000], return_tensors="pt").input_ids[:, :tokens]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def section_generate(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    checkpoints = _checkpoints(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt = _prompt(tokenizer, args.prompt_tokens)
    print(
        f"\n### Greedy generation of {args.new_tokens} new tokens, prompt of {prompt['input_ids'].shape[1]} tokens, "
        f"threads={torch.get_num_threads()}, median of {args.reps_generate} interleaved runs\n"
    )
    print(
        "| dtype | model | tokens/s (prompt + generation) | vs dense | prefill tokens/s (first token) | vs dense "
        f"| decode tokens/s ({args.new_tokens} tokens - first token) | vs dense |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        models = {"dense": _load(args.model, dtype, None)}
        for mode in args.generate_modes:
            for bits, checkpoint in checkpoints.items():
                models[f"{_label(*bits)} ({mode})"] = _load(checkpoint, dtype, mode)

        def runner(model, new_tokens: int):
            def run() -> None:
                model.generate(
                    **prompt,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                )

            return run

        with torch.no_grad():
            times = time_variants(
                {name: runner(m, args.new_tokens) for name, m in models.items()}, args.reps_generate, 1
            )
            # Time to the first token: `generate` with one new token is the prefill with the cache on, as users run it.
            prefill = time_variants({name: runner(m, 1) for name, m in models.items()}, args.reps_generate, 1)
        # The first new token comes out of the prefill; the other `new_tokens - 1` are decode steps, so their time is
        # the difference of the two `generate` calls (generation overhead per step included, prefill excluded).
        decode = {
            name: max(seconds - prefill[name], 1e-9) / max(args.new_tokens - 1, 1) for name, seconds in times.items()
        }
        for name, seconds in times.items():
            print(
                f"| {dtype_name} | {name} | {args.new_tokens / seconds:.1f} | {times['dense'] / seconds:.2f}x |"
                f" {prompt['input_ids'].shape[1] / prefill[name]:.0f} | {prefill['dense'] / prefill[name]:.2f}x |"
                f" {1 / decode[name]:.1f} | {decode['dense'] / decode[name]:.2f}x |",
                flush=True,
            )
        del models


def _measure_memory(path: str, dtype_name: str, mode: str, new_tokens: int, prompt_tokens: int = 0) -> None:
    """Child process: load, generate, print peak RSS. A fresh process so ru_maxrss is this variant's own peak."""
    import psutil
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    prompt = _prompt(tokenizer, prompt_tokens)  # before `base`: reading WikiText-2 is not the model's memory
    gc.collect()
    base = psutil.Process().memory_info().rss
    model = _load(Path(path), DTYPES[dtype_name], None if mode == "none" else mode)
    loaded = psutil.Process().memory_info().rss
    gc.collect()
    serving = _reset_peak()  # from here the peak is serving's own, not the load's transient (a float32 file cast)
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    status = _proc_status()
    if serving:
        peak = status.get("VmHWM", peak)
    print(
        json.dumps(
            {
                "base": base,
                "loaded": loaded,
                "after": psutil.Process().memory_info().rss,
                "anon": status.get("RssAnon", 0),
                "file": status.get("RssFile", 0),
                "peak": peak,
            }
        )
    )


def _reset_peak() -> bool:
    """Reset this process's peak resident size (Linux >= 4.0: `5` into `/proc/self/clear_refs`); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _proc_status() -> dict[str, int]:
    """Resident anonymous / file-backed bytes (Linux): mmap'd checkpoint pages count in RSS but are reclaimable."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines) if v.strip().endswith("kB")}


def _label(value_bits: int, embedding_bits: int = 16) -> str:
    label = "compressed" if value_bits >= 16 else f"compressed, {value_bits}-bit values"
    return label + (", int8 embedding" if embedding_bits < 16 else "")


def _checkpoints(args: argparse.Namespace) -> dict[tuple[int, int], Path]:
    """`{(value_bits, embedding_bits): folder}` for every combination asked for."""
    return {
        (bits, ebits): compressed_checkpoint(args, bits, ebits)
        for bits in args.value_bits
        for ebits in args.embedding_bits
    }


def section_memory(args: argparse.Namespace) -> None:
    checkpoints = _checkpoints(args)
    print(
        f"\n### Resident memory (MB) while generating {args.new_tokens} tokens after a prompt of "
        f"{args.prompt_tokens or 5} tokens, one fresh process per row\n"
    )
    print(
        "| dtype | model | after import | after load | after generate | of which anonymous | of which file-backed "
        "(mmap'd checkpoint) | peak while generating | peak - import |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        rows = [("dense", str(args.model), "none")] + [
            (f"{_label(*bits)} ({mode})", str(checkpoint), mode)
            for mode in args.generate_modes
            for bits, checkpoint in checkpoints.items()
        ]
        for name, path, mode in rows:
            code = (
                "import sys; sys.path.insert(0, sys.argv[1]); import speed; "
                "speed._measure_memory(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))"
            )
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        code,
                        str(Path(__file__).parent),
                        path,
                        dtype_name,
                        mode,
                        str(args.new_tokens),
                        str(args.prompt_tokens or 0),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            mem = {k: v / 1e6 for k, v in json.loads(out).items()}
            print(
                f"| {dtype_name} | {name} | {mem['base']:.0f} | {mem['loaded']:.0f} | {mem['after']:.0f} | "
                f"{mem['anon']:.0f} | {mem['file']:.0f} | {mem['peak']:.0f} | {mem['peak'] - mem['base']:.0f} |",
                flush=True,
            )


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {
    "floor": section_floor,
    "layers": section_layers,
    "generate": section_generate,
    "memory": section_memory,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", nargs="+", choices=sorted(SECTIONS), default=["floor", "layers"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128])
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--kappa", type=float, default=0.25)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--min-pass-s", type=float, default=0.02, help="time per timed repetition (layers)")
    parser.add_argument("--cache", choices=["cold", "hot"], default="cold")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="execution modes (layers)")
    parser.add_argument("--model", type=Path, default=None, help="dense SmolLM2 folder (default: the local copy)")
    parser.add_argument("--checkpoint", type=Path, default=Path.home() / ".cache" / "optimum_oats" / "speed-oats-r0.5")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument(
        "--prompt-tokens", type=int, default=0, help="prompt length for generate/memory (0: a 5-token prompt)"
    )
    parser.add_argument("--reps-generate", type=int, default=3)
    parser.add_argument("--generate-modes", nargs="+", choices=MODES, default=["auto"])
    parser.add_argument(
        "--value-bits", type=int, nargs="+", default=[16], help="compressed checkpoints to compare (16: float values)"
    )
    parser.add_argument(
        "--embedding-bits", type=int, nargs="+", default=[16], help="and of each, 16: bf16 embedding, 8: int8 rows"
    )
    args = parser.parse_args()
    args.model = Path(args.model or smollm2_path())
    torch.set_num_threads(args.threads)
    provenance = Provenance.start()
    print(f"threads={args.threads}, compiled kernel available: {kernel_available()}")
    for section in args.section:
        SECTIONS[section](args)
    print(f"\n{provenance.line()}")


if __name__ == "__main__":
    main()
