"""Quality benchmark: WikiText-2 token perplexity of SmolLM2-135M compressed by each method, side by side.

Protocol (printed with the table): calibration on `num_samples` C4 windows of `seqlen` tokens from
`$OATS_DATA_DIR/c4/c4_sample.jsonl`, seed 0; WikiText-2 raw test joined with "\\n\\n", non-overlapping windows of
`eval_seqlen` tokens, first `windows` windows, exp(mean NLL).

Each (method, rate) result is stored as one JSON file under `--output`, so a stopped sweep resumes where it left off.

    python benchmarks/quality.py                    # the BENCHMARKS.md setting (rho = 0.5)
    python benchmarks/quality.py --rates 0.3 0.4 0.5 0.6
    python benchmarks/quality.py --quick            # minutes: a smoke run for CI
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_oats import OATSConfig, compress, compression_report
from optimum_oats.config import parse_nm
from optimum_oats.default_model import default_model_path
from optimum_oats.evaluation import token_perplexity, wikitext2_text

METHODS = ("magnitude", "wanda", "sparsegpt", "oats")
SWEEP_OWL = (5.0, 0.08)  # (M, lambda) of every OWL entry without an -M..-l.. suffix in its key


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
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--svd", default="exact", choices=["exact", "fast"], help="OATS's rank-r step")
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
    parser.add_argument("--plot", default=None, help="write perplexity vs rate (one line per method) to this PNG")
    parser.add_argument("--output", default="bench_results/quality")
    parser.add_argument("--quick", action="store_true", help="4 x 256 calibration, 4 x 512 evaluation, 10 iterations")
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.seqlen, args.eval_seqlen, args.windows, args.iterations = 4, 256, 512, 4, 10
        args.output = args.output + "-quick"
    return args


def run_one(file: Path, fn) -> dict | None:
    """Compute `fn()` once and store it atomically; later runs read the stored result (resume after a stop)."""
    if file.is_file():
        return json.loads(file.read_text())
    result = fn()
    if result is None:
        return None
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, file)
    return result


def main() -> None:
    args = parse_args()
    data_dir = Path(os.environ.get("OATS_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    os.environ["OATS_DATA_DIR"] = str(data_dir)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = wikitext2_text(data_dir)

    def evaluate(model) -> float:
        return token_perplexity(model, tokenizer, text, seqlen=args.eval_seqlen, max_windows=args.windows)

    def dense() -> dict:
        return {"perplexity": evaluate(AutoModelForCausalLM.from_pretrained(model_path)), "seconds": 0.0}

    owl = {"owl_threshold": args.owl_threshold, "owl_lambda": args.owl_lambda}

    def compressed(method: str, rate: float, layerwise: str, pattern: str):
        def fn() -> dict:
            model = AutoModelForCausalLM.from_pretrained(model_path)
            config = OATSConfig(
                compression_rate=rate,
                rank_ratio=args.rank_ratio,
                method=method,
                sparsity_pattern=pattern,
                dataset="c4",
                num_samples=args.num_samples,
                seqlen=args.seqlen,
                num_iterations=args.iterations,
                seed=0,
                layerwise=layerwise,
                svd=args.svd,
                **(owl if layerwise == "owl" else {}),
            )
            start = time.perf_counter()
            compress(model, config, tokenizer)
            seconds = time.perf_counter() - start
            report = compression_report(model)
            return {
                "perplexity": evaluate(model),
                "seconds": seconds,
                "kept_fraction": report.kept_fraction,
                "mean_relative_error": report.mean_relative_error,
            }

        return fn

    def missing() -> None:
        return None  # --table-only: shown as "not run yet", not stored

    runs = [
        (m, r, lw, "unstructured")
        for r in args.rates
        for lw in args.layerwise
        for m in args.methods
        if "unstructured" in args.patterns
    ]
    runs += [(m, nm_rate(p), "uniform", p) for p in args.patterns if p != "unstructured" for m in args.methods]
    results = {}
    if not args.skip_dense:
        results["dense"] = run_one(out / "dense.json", missing if args.table_only else dense)
    for method, rate, layerwise, pattern in runs:
        key = entry_key(method, rate, layerwise, pattern, args)
        compute = missing if args.table_only else compressed(method, rate, layerwise, pattern)
        results[key] = run_one(out / f"{key}.json", compute)
    if args.skip_dense:
        return

    print(
        f"\n## Quality: SmolLM2-135M-Instruct, {date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"calibration: {args.num_samples} x {args.seqlen} C4 tokens, seed 0; OATS kappa={args.rank_ratio}, "
        f"{args.iterations} iterations, {args.svd} SVD; OWL M={args.owl_threshold}, lambda={args.owl_lambda}"
    )
    print(f"evaluation: WikiText-2 test token perplexity, first {args.windows} windows of {args.eval_seqlen} tokens\n")
    if results["dense"] is None:
        raise SystemExit("--table-only: the dense baseline has not been run in this --output folder yet")
    dense_ppl = results["dense"]["perplexity"]
    print("| method | pattern | layerwise | rho | kept | perplexity | ppl / dense | mean rel. error | compress s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| dense | - | - | 0 | 1.000 | {dense_ppl:.2f} | 1.00 | - | - |")
    for method, rate, layerwise, pattern in runs:
        r = results[entry_key(method, rate, layerwise, pattern, args)]
        if r is None:
            print(f"| {method} | {pattern} | {layerwise} | {rate} | not run yet | | | | |")
            continue
        print(
            f"| {method} | {pattern} | {layerwise} | {rate} | {r['kept_fraction']:.3f} | {r['perplexity']:.2f} | "
            f"{r['perplexity'] / dense_ppl:.2f} | {r['mean_relative_error']:.4f} | {r['seconds']:.0f} |"
        )
    if args.plot:
        print(f"\nplot: {plot_sweep(runs, results, dense_ppl, args, Path(args.plot))}")


def nm_rate(pattern: str) -> float:
    """The nominal rate of an N:M pattern (its sparse part's; OATS adds the low-rank term on top)."""
    n, m = parse_nm(pattern)
    return round(1 - n / m, 4)


def entry_key(method: str, rate: float, layerwise: str, pattern: str, args: argparse.Namespace) -> str:
    """File name of one result; settings that differ from the original protocol are part of it."""
    key = f"{method}-{layerwise}-{rate}"
    if pattern != "unstructured":
        key += f"-{pattern.replace(':', 'of')}"
    if method == "oats" and args.svd != "exact":
        key += f"-{args.svd}"
    if method == "oats" and args.rank_ratio != 0.25:
        key += f"-k{args.rank_ratio}"
    if layerwise == "owl" and (args.owl_threshold, args.owl_lambda) != SWEEP_OWL:
        key += f"-M{args.owl_threshold}-l{args.owl_lambda}"
    return key


def plot_sweep(runs: list, results: dict, dense_ppl: float, args: argparse.Namespace, path: Path) -> Path:
    """Perplexity against compression rate, one line per (method, layerwise); N:M entries as markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for method, rate, layerwise, pattern in runs:
        result = results[entry_key(method, rate, layerwise, pattern, args)]
        if result is None:
            continue
        ppl = result["perplexity"]
        if pattern == "unstructured":
            lines.setdefault((method, layerwise), []).append((rate, ppl))
        else:
            real_rate = 1 - result["kept_fraction"]  # N:M + low rank keeps more than N/M: plot where it really is
            ax.scatter([real_rate], [ppl], marker="x", color=f"C{METHODS.index(method)}", label=f"{method} {pattern}")
    for (method, layerwise), points in sorted(lines.items()):
        xs, ys = zip(*sorted(points), strict=True)
        style = "-" if layerwise == "uniform" else "--"
        color = f"C{METHODS.index(method)}"
        ax.plot(xs, ys, marker="o", color=color, linestyle=style, label=f"{method} ({layerwise})")
    ax.axhline(dense_ppl, color="black", linewidth=0.8, label=f"dense ({dense_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("compression rate rho (fraction of each layer's parameters removed)")
    ax.set_ylabel("WikiText-2 token perplexity (log)")
    ax.set_title(f"SmolLM2-135M: calib {args.num_samples}x{args.seqlen} C4, eval {args.windows}x{args.eval_seqlen}")
    ax.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    main()
