"""Quality benchmark: WikiText-2 token perplexity of SmolLM2-135M compressed by each method, side by side.

Protocol (printed with the table): calibration on `num_samples` C4 windows of `seqlen` tokens from
`$OATS_DATA_DIR/c4/c4_sample.jsonl`, seeded by `--seed` (0); WikiText-2 raw test joined with "\\n\\n", non-overlapping
windows of `eval_seqlen` tokens, first `windows` windows, exp(mean NLL).

Each (method, rate) result is stored as one JSON file under `--output`, so a stopped sweep resumes where it left off.

    python benchmarks/quality.py                    # the BENCHMARKS.md setting (rho = 0.5)
    python benchmarks/quality.py --rates 0.3 0.4 0.5 0.6
    python benchmarks/quality.py --quick            # minutes: a smoke run for CI
    python benchmarks/quality.py --methods oats --rates 0.7 --svd exact fast --seed 0 1 2   # solvers, paired by seed

Quantized values and factors (`--value-bits 4 3`, `--group-size`, `--lowrank-bits`) are part of the sweep; the table
then has a bits-per-weight column (all stored bits of the compressed layers: values, mask, scales and factors, over
their dense weight count; `compression_report(model).bits_per_weight`).

    python benchmarks/quality.py --methods hassle sparsegpt --rates 0.3 --value-bits 4 --lowrank-bits 8 --seed 0 1 2

Result files (one JSON per cell, `<output>/<key>.json`; `dense.json` holds `perplexity` and `seconds` only):
`perplexity`, `seconds` (compression), `kept_fraction`, `mean_relative_error`, `device`, and since quantization
`bits_per_weight`, `value_bits` (16: float), `group_size` (None unless quantized), `lowrank_bits` (None without a
low-rank term), `method`, `compression_rate`, `rank_ratio` (as used), `seed`, `calibration`, `evaluation` and
`model_dtype`. The key is `<method>-<layerwise>-<rate>`, then the settings that differ from the original protocol,
e.g. `hassle-uniform-0.3-fast-k0.1-h2-lam0.5-v4-g128-uv8-s1` (quantized runs gain `-v<bits>-g<group>[-uv<bits>]`
before the seed; unquantized keys are unchanged).

With both solvers and several seeds a paired table follows: fast / exact perplexity per seed and its geometric
mean with a 95% t interval, the yardstick for "the fast solver costs no accuracy" where one run is too noisy.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from statistics import fmean
from typing import NamedTuple

import torch
from toolkit.cells import resume_cell, write_figure
from toolkit.data import data_root
from toolkit.intervals import geometric_interval
from toolkit.models import checked_device, load_causal_lm, load_tokenizer, smollm2_path
from toolkit.provenance import Provenance

from optimum_oats import OATSConfig, compress, compression_report
from optimum_oats.algorithms import ALGORITHMS
from optimum_oats.algorithms.hessian_slr import default_shrinkage
from optimum_oats.config import parse_nm
from optimum_oats.engine.refine import (
    AUTO_REFINE_LR,
    AUTO_REFINE_LR_FROM_RATE,
    AUTO_REFINE_LR_HIGH_RATE,
    default_refine_lr,
)
from optimum_oats.evaluation import token_perplexity, wikitext2_text

METHODS = ("magnitude", "wanda", "sparsegpt", "oats", "hassle")
SWEEP_OWL = (5.0, 0.08)  # (M, lambda) of every OWL entry without an -M..-l.. suffix in its key


class Entry(NamedTuple):
    """One compressed model of the sweep."""

    method: str
    rate: float
    layerwise: str
    pattern: str
    svd: str  # OATS's solver; other methods record the first --svd value and ignore it
    seed: int
    value_bits: int = 16


# `OATSConfig.refine_lr` unset, in words (engine.refine.default_refine_lr).
REFINE_LR_BY_RATE = (
    f"by rate ({AUTO_REFINE_LR_HIGH_RATE:g} from {AUTO_REFINE_LR_FROM_RATE:g} on, else {AUTO_REFINE_LR:g})"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--layerwise", nargs="+", default=["uniform"], choices=["uniform", "owl"])
    parser.add_argument("--skip-dense", action="store_true", help="do not compute the dense baseline in this run")
    parser.add_argument("--table-only", action="store_true", help="print the table from stored results only")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument(
        "--seed", type=int, nargs="+", default=[0], help="calibration sample seeds (several measure the noise)"
    )
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument(
        "--sampling",
        default="joined",
        choices=["joined", "documents", "random_windows"],
        help="how calibration windows are drawn (OATSConfig.calibration_sampling); 'joined' is the sweep protocol's",
    )
    parser.add_argument("--refine-steps", type=int, default=0, help="block refinement steps (OATSConfig.refine_steps)")
    parser.add_argument(
        "--refine-lr",
        type=float,
        default=None,
        help=f"block refinement learning rate (OATSConfig.refine_lr; default: {REFINE_LR_BY_RATE})",
    )
    parser.add_argument(
        "--refine-lowrank-lr",
        type=float,
        default=None,
        help="block refinement rate of U and V (OATSConfig.refine_lowrank_lr; default: --refine-lr)",
    )
    parser.add_argument(
        "--hessian-iterations", type=int, default=2, help="method hassle: alternations (OATSConfig.hessian_iterations)"
    )
    parser.add_argument(
        "--hessian-shrinkage",
        type=float,
        default=None,
        help="method hassle: metric (1 - lambda) H + lambda diag(H) (OATSConfig.hessian_shrinkage; default: by rate)",
    )
    parser.add_argument(
        "--hassle-rank-ratio",
        type=float,
        default=0.1,
        help="method hassle: kappa (the library default, not --rank-ratio)",
    )
    parser.add_argument(
        "--value-bits", type=int, nargs="+", default=[16], help="bits of S's kept values (OATSConfig.value_bits)"
    )
    parser.add_argument("--group-size", type=int, default=128, help="columns per scale (OATSConfig.group_size)")
    parser.add_argument("--lowrank-bits", type=int, default=16, help="bits of U and V (OATSConfig.lowrank_bits)")
    parser.add_argument(
        "--embedding-bits", type=int, default=16, help="bits of the tied embedding and LM head (OATSConfig)"
    )
    parser.add_argument("--svd", nargs="+", default=["exact"], choices=["exact", "fast"], help="OATS's rank-r step")
    parser.add_argument(
        "--patterns",
        nargs="+",
        default=["unstructured"],
        help="sparsity patterns, e.g. unstructured 2:4 (N:M runs ignore --rates and --layerwise)",
    )
    # The sweep's OWL setting is pinned (the reference's M = 5, lambda = 0.08), not OATSConfig's default, so that
    # stored entries keep their meaning when the library default changes; other values get their own result key.
    parser.add_argument("--owl-threshold", type=float, default=SWEEP_OWL[0], help="OWL's M")
    parser.add_argument("--owl-lambda", type=float, default=SWEEP_OWL[1], help="OWL's lambda")
    parser.add_argument(
        "--paired-against",
        nargs="+",
        default=["sparsegpt"],
        choices=METHODS,
        help="with several seeds: a table of every method's perplexity over each of these, paired by seed",
    )
    parser.add_argument("--plot", default=None, help="write perplexity vs rate (one line per method) to this PNG")
    parser.add_argument("--output", default="bench_results/quality")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where each model is compressed and evaluated, e.g. cuda (give each device its own --output: the "
        "stored results do not carry it in their file names)",
    )
    parser.add_argument("--quick", action="store_true", help="4 x 256 calibration, 4 x 512 evaluation, 10 iterations")
    args = parser.parse_args()
    if args.table_only and args.skip_dense:
        parser.error("--table-only prints the table against the dense baseline; drop --skip-dense")
    args.device = checked_device(parser, args.device)
    if args.quick:
        args.num_samples, args.seqlen, args.eval_seqlen, args.windows, args.iterations = 4, 256, 512, 4, 10
        args.output = args.output + "-quick"
    return args


def main() -> None:
    args = parse_args()
    provenance = Provenance.start()
    data_dir = data_root(export=True)  # exported: compress() finds its C4 calibration there
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model_path = smollm2_path()
    tokenizer = load_tokenizer(model_path)
    text = wikitext2_text(data_dir)

    def evaluate(model) -> float:
        return token_perplexity(model, tokenizer, text, seqlen=args.eval_seqlen, max_windows=args.windows)

    def dense() -> dict:
        return {
            "perplexity": evaluate(load_causal_lm(model_path).to(args.device)),
            "seconds": 0.0,
        }

    owl = {"owl_threshold": args.owl_threshold, "owl_lambda": args.owl_lambda}

    def compressed(entry: Entry):
        def fn() -> dict:
            model = load_causal_lm(model_path).to(args.device)
            config = OATSConfig(
                compression_rate=entry.rate,
                rank_ratio=args.hassle_rank_ratio if entry.method == "hassle" else args.rank_ratio,
                hessian_iterations=args.hessian_iterations,
                hessian_shrinkage=args.hessian_shrinkage,
                method=entry.method,
                sparsity_pattern=entry.pattern,
                dataset="c4",
                num_samples=args.num_samples,
                seqlen=args.seqlen,
                num_iterations=args.iterations,
                seed=entry.seed,
                layerwise=entry.layerwise,
                svd=entry.svd,
                calibration_sampling=args.sampling,
                refine_steps=args.refine_steps,
                refine_lr=args.refine_lr,
                refine_lowrank_lr=args.refine_lowrank_lr,
                value_bits=entry.value_bits,
                group_size=args.group_size,
                lowrank_bits=args.lowrank_bits,
                embedding_bits=args.embedding_bits,
                **(owl if entry.layerwise == "owl" else {}),
            )
            cuda = args.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            compress(model, config, tokenizer)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() if cuda else None  # compression only, model weights included
            report = compression_report(model)
            result = {
                "perplexity": evaluate(model),
                "seconds": seconds,
                "kept_fraction": report.kept_fraction,
                "mean_relative_error": report.mean_relative_error,
                "device": str(args.device),
                "bits_per_weight": report.bits_per_weight,
                "value_bits": entry.value_bits,
                "group_size": args.group_size if config.quantized else None,
                "lowrank_bits": args.lowrank_bits if config.uses_low_rank else None,
                "embedding_bits": args.embedding_bits,
                "method": entry.method,
                "compression_rate": entry.rate,
                "rank_ratio": config.effective_rank_ratio,
                "seed": entry.seed,
                "calibration": f"{args.num_samples}x{args.seqlen} c4 {args.sampling}",
                "evaluation": f"wikitext2 test, first {args.windows} windows of {args.eval_seqlen}",
                "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            }
            if cuda:
                result["peak_memory_bytes"] = peak
            return result

        return fn

    def missing() -> None:
        return None  # --table-only: shown as "not run yet", not stored

    unstructured = "unstructured" in args.patterns
    settings = [(r, lw, "unstructured") for r in args.rates for lw in args.layerwise if unstructured]
    settings += [(nm_rate(p), "uniform", p) for p in args.patterns if p != "unstructured"]
    runs = [
        Entry(m, r, lw, p, svd, seed, bits)
        for seed in args.seed
        for r, lw, p in settings
        for bits in args.value_bits
        for m in args.methods
        for svd in (args.svd if m == "oats" else args.svd[:1])
    ]
    if not args.skip_dense:
        dense_result = resume_cell(out / "dense.json", missing if args.table_only else dense)
    results = {}
    for entry in runs:
        compute = missing if args.table_only else compressed(entry)
        results[entry] = resume_cell(out / f"{entry_key(entry, args)}.json", compute)
    if args.skip_dense:
        return

    print(f"\n## Quality: SmolLM2-135M-Instruct, device {args.device}\n{provenance.line()}")
    print(
        f"calibration: {args.num_samples} x {args.seqlen} C4 tokens, seed {' '.join(map(str, args.seed))}; OATS "
        f"kappa={args.rank_ratio}, {args.iterations} iterations, {' / '.join(args.svd)} SVD; "
        f"OWL M={args.owl_threshold}, lambda={args.owl_lambda}"
    )
    print(f"evaluation: WikiText-2 test token perplexity, first {args.windows} windows of {args.eval_seqlen} tokens\n")
    if dense_result is None:
        raise SystemExit("--table-only: the dense baseline has not been run in this --output folder yet")
    dense_ppl = dense_result["perplexity"]
    print(
        "| method | pattern | layerwise | rho | kept | bits/weight | perplexity | ppl / dense | mean rel. error "
        "| compress s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| dense | - | - | 0 | 1.000 | - | {dense_ppl:.2f} | 1.00 | - | - |")
    for entry, r in results.items():
        row = f"| {label(entry, args)} | {entry.pattern} | {entry.layerwise} | {entry.rate} |"
        if r is None:
            print(f"{row} not run yet | | | | | |")
            continue
        bits = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "-"  # absent in older results
        print(
            f"{row} {r['kept_fraction']:.3f} | {bits} | {r['perplexity']:.2f} | {r['perplexity'] / dense_ppl:.2f} | "
            f"{r['mean_relative_error']:.4f} | {r['seconds']:.0f} |"
        )
    if "oats" in args.methods and len(args.svd) == 2:
        print_solver_pairs(results)
    for baseline in args.paired_against:
        if baseline in args.methods and len(args.seed) > 1:
            print_paired_vs_baseline(results, args, baseline)
    if args.plot:
        print(f"\nplot: {plot_sweep(results, dense_ppl, args, Path(args.plot))}")


def label(entry: Entry, args: argparse.Namespace) -> str:
    """The method, with the solver and seed where the run compares several."""
    parts = [entry.method]
    if entry.value_bits != 16 or args.lowrank_bits != 16:
        parts.append(
            f"W{entry.value_bits}" + (f"/UV{args.lowrank_bits}" if ALGORITHMS[entry.method].uses_low_rank else "")
        )
    if entry.method == "oats" and len(args.svd) > 1:
        parts.append(entry.svd)
    if len(args.seed) > 1:
        parts.append(f"seed {entry.seed}")
    return " ".join(parts)


def print_solver_pairs(results: dict[Entry, dict | None]) -> None:
    """Fast / exact OATS perplexity paired by seed: geometric mean and 95% t interval of the ratio.

    A single pair is not evidence at high compression, where runs that differ only in fp rounding spread by tens
    of percent; pairing by calibration seed removes the data's share of the spread, the interval shows the rest.
    """
    pairs: dict[tuple, list[tuple[int, float, float]]] = {}
    for entry, exact in results.items():
        fast = results.get(entry._replace(svd="fast"))
        if entry.method == "oats" and entry.svd == "exact" and exact is not None and fast is not None:
            setting = (entry.rate, entry.layerwise, entry.pattern)
            pairs.setdefault(setting, []).append((entry.seed, exact["perplexity"], fast["perplexity"]))
    if not pairs:
        return
    print("\n### Fast vs exact solver, paired by calibration seed\n")
    print("| rho | layerwise | pattern | seeds | exact ppl per seed | fast ppl per seed | fast / exact per seed |")
    print("|---|---|---|---|---|---|---|")
    summaries = []
    for (rate, layerwise, pattern), rows in pairs.items():
        seeds, exact, fast = zip(*rows, strict=True)
        ratios = [f / e for e, f in zip(exact, fast, strict=True)]
        print(
            f"| {rate} | {layerwise} | {pattern} | {' '.join(map(str, seeds))} | {' '.join(f'{e:.2f}' for e in exact)}"
            f" | {' '.join(f'{f:.2f}' for f in fast)} | {' '.join(f'{q:.3f}' for q in ratios)} |"
        )
        mean, interval = geometric_interval(ratios)
        summary = f"- rho {rate} {layerwise} {pattern}: geometric mean fast / exact {mean:.3f}"
        if interval is not None:
            summary += (
                f", 95% t interval [{interval[0]:.3f}, {interval[1]:.3f}] over "
                f"{len(ratios)} seeds; exact's own spread across seeds max / min {max(exact) / min(exact):.2f}"
            )
        else:
            summary += " (one seed: no interval)"
        summaries.append(summary)
    print("\n" + "\n".join(summaries))


def print_paired_vs_baseline(results: dict[Entry, dict | None], args: argparse.Namespace, baseline: str) -> None:
    """Every method's perplexity over the baseline's at the same setting, paired by calibration seed: geometric
    mean and 95% t interval of the ratio (below 1: better than the baseline; an interval excluding 1: evidence)."""
    ratios: dict[tuple, list[float]] = {}
    for entry, result in results.items():
        base = results.get(entry._replace(method=baseline, svd=args.svd[0]))
        if entry.method == baseline or result is None or base is None:
            continue
        setting = (
            label(entry._replace(seed=0), args).replace(" seed 0", ""),
            entry.rate,
            entry.layerwise,
            entry.pattern,
        )
        ratios.setdefault(setting, []).append(result["perplexity"] / base["perplexity"])
    if not ratios:
        return
    lowrank = f", U, V at {args.refine_lowrank_lr:g}" if args.refine_lowrank_lr is not None else ""
    lr = REFINE_LR_BY_RATE if args.refine_lr is None else f"{args.refine_lr:g}"
    refine = f", both refined ({args.refine_steps} steps, lr {lr}{lowrank})" if args.refine_steps else ""
    print(f"\n### Perplexity / {baseline}'s, paired by calibration seed{refine}\n")
    print("| method | rho | layerwise | pattern | seeds | ratio per seed | geometric mean | 95% t interval |")
    print("|---|---|---|---|---|---|---|---|")
    for (method, rate, layerwise, pattern), values in ratios.items():
        mean, interval = geometric_interval(values)
        shown = "-" if interval is None else f"[{interval[0]:.3f}, {interval[1]:.3f}]"
        print(
            f"| {method} | {rate} | {layerwise} | {pattern} | {len(values)} | {' '.join(f'{v:.3f}' for v in values)}"
            f" | {mean:.3f} | {shown} |"
        )


def nm_rate(pattern: str) -> float:
    """The nominal rate of an N:M pattern (its sparse part's; OATS adds the low-rank term on top)."""
    n, m = parse_nm(pattern)
    return round(1 - n / m, 4)


def entry_key(entry: Entry, args: argparse.Namespace) -> str:
    """File name of one result; settings that differ from the original protocol are part of it."""
    method, layerwise, pattern = entry.method, entry.layerwise, entry.pattern
    key = f"{method}-{layerwise}-{entry.rate}"
    if pattern != "unstructured":
        key += f"-{pattern.replace(':', 'of')}"
    if method == "oats" and entry.svd != "exact":
        key += f"-{entry.svd}"
    if method == "oats" and args.rank_ratio != 0.25:
        key += f"-k{args.rank_ratio}"
    if method == "hassle":
        key += f"-{entry.svd}-k{args.hassle_rank_ratio}-h{args.hessian_iterations}"
        shrinkage = args.hessian_shrinkage
        if shrinkage is None and layerwise == "uniform" and pattern == "unstructured":
            shrinkage = default_shrinkage(entry.rate)  # the same run as that value given explicitly
        key += "-lamauto" if shrinkage is None else f"-lam{shrinkage:g}" if shrinkage else ""
    if layerwise == "owl" and (args.owl_threshold, args.owl_lambda) != SWEEP_OWL:
        key += f"-M{args.owl_threshold}-l{args.owl_lambda}"
    quantized = entry.value_bits != 16 or (args.lowrank_bits != 16 and ALGORITHMS[method].uses_low_rank)
    if quantized:  # unquantized runs keep their old keys
        key += f"-v{entry.value_bits}-g{args.group_size}"
        if ALGORITHMS[method].uses_low_rank:
            key += f"-uv{args.lowrank_bits}"
    if args.embedding_bits != 16:
        key += f"-e{args.embedding_bits}"
    if entry.seed != 0:
        key += f"-s{entry.seed}"
    if args.sampling != "joined":
        key += f"-c{args.sampling}"
    if args.refine_steps:
        lr = args.refine_lr
        if lr is None and layerwise == "uniform" and pattern == "unstructured":
            lr = default_refine_lr(entry.rate)  # the same run as that value given explicitly
        key += f"-r{args.refine_steps}" + ("-lrauto" if lr is None else f"-lr{lr:g}")
        if args.refine_lowrank_lr is not None and ALGORITHMS[entry.method].uses_low_rank:  # else: no U, V
            key += f"-uv{args.refine_lowrank_lr:g}"
    return key


def plot_sweep(results: dict[Entry, dict | None], dense_ppl: float, args: argparse.Namespace, path: Path) -> Path:
    """Perplexity against compression rate, one line per (method, layerwise); N:M entries as markers.

    With several calibration seeds a point is the geometric mean over the seeds run, its bar their range."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lines: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    for entry, result in results.items():
        if result is None:
            continue
        ppl, color = result["perplexity"], f"C{METHODS.index(entry.method)}"
        name = label(entry._replace(seed=0), args).replace(" seed 0", "")
        if entry.pattern == "unstructured":
            lines.setdefault((name, entry.layerwise, color), {}).setdefault(entry.rate, []).append(ppl)
        else:
            real_rate = 1 - result["kept_fraction"]  # N:M + low rank keeps more than N/M: plot where it really is
            ax.scatter([real_rate], [ppl], marker="x", color=color, label=f"{name} {entry.pattern} seed {entry.seed}")
    for (name, layerwise, color), by_rate in sorted(lines.items()):
        xs = sorted(by_rate)
        ys = [math.exp(fmean(math.log(v) for v in by_rate[x])) for x in xs]
        low = [y - min(by_rate[x]) for x, y in zip(xs, ys, strict=True)]
        high = [max(by_rate[x]) - y for x, y in zip(xs, ys, strict=True)]
        seeds = max(len(v) for v in by_rate.values())
        style = "-" if layerwise == "uniform" else "--"
        tag = f"{name} ({layerwise})" + (f", geo-mean of <= {seeds} seeds" if seeds > 1 else "")
        ax.errorbar(xs, ys, yerr=[low, high], marker="o", color=color, linestyle=style, capsize=3, label=tag)
    ax.axhline(dense_ppl, color="black", linewidth=0.8, label=f"dense ({dense_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("compression rate rho (fraction of each layer's parameters removed)")
    ax.set_ylabel("WikiText-2 token perplexity (log)")
    ax.set_title(f"SmolLM2-135M: calib {args.num_samples}x{args.seqlen} C4, eval {args.windows}x{args.eval_seqlen}")
    ax.legend(fontsize=7, ncol=2)
    return write_figure(fig, path)


if __name__ == "__main__":
    main()
