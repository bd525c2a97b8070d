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
from optimum_oats.default_model import default_model_path
from optimum_oats.evaluation import token_perplexity, wikitext2_text

METHODS = ("magnitude", "wanda", "sparsegpt", "oats")


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
    parser.add_argument("--output", default="bench_results/quality")
    parser.add_argument("--quick", action="store_true", help="4 x 256 calibration, 4 x 512 evaluation, 10 iterations")
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.seqlen, args.eval_seqlen, args.windows, args.iterations = 4, 256, 512, 4, 10
        args.output = args.output + "-quick"
    return args


def run_one(key: str, path: Path, fn) -> dict:
    """Compute `fn()` once; later runs read the stored result (resume after a stop)."""
    file = path / f"{key}.json"
    if file.is_file():
        return json.loads(file.read_text())
    result = fn()
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

    def compressed(method: str, rate: float, layerwise: str):
        def fn() -> dict:
            model = AutoModelForCausalLM.from_pretrained(model_path)
            config = OATSConfig(
                compression_rate=rate,
                rank_ratio=args.rank_ratio,
                method=method,
                dataset="c4",
                num_samples=args.num_samples,
                seqlen=args.seqlen,
                num_iterations=args.iterations,
                seed=0,
                layerwise=layerwise,
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

    def missing() -> dict:
        raise SystemExit("--table-only: a result is missing; run without it first")

    runs = [(m, r, lw) for r in args.rates for lw in args.layerwise for m in args.methods]
    results = {}
    if not args.skip_dense:
        results["dense"] = run_one("dense", out, missing if args.table_only else dense)
    for method, rate, layerwise in runs:
        key = f"{method}-{layerwise}-{rate}"
        results[key] = run_one(key, out, missing if args.table_only else compressed(method, rate, layerwise))
    if args.skip_dense:
        return

    print(f"\n## Quality: SmolLM2-135M-Instruct, {date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"calibration: {args.num_samples} x {args.seqlen} C4 tokens, seed 0; OATS kappa={args.rank_ratio}, "
          f"{args.iterations} iterations, exact SVD")
    print(f"evaluation: WikiText-2 test token perplexity, first {args.windows} windows of {args.eval_seqlen} tokens\n")
    dense_ppl = results["dense"]["perplexity"]
    print("| method | layerwise | rho | kept | perplexity | ppl / dense | mean rel. error | compress time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| dense | - | 0 | 1.000 | {dense_ppl:.2f} | 1.00 | - | - |")
    for method, rate, layerwise in runs:
        r = results[f"{method}-{layerwise}-{rate}"]
        print(f"| {method} | {layerwise} | {rate} | {r['kept_fraction']:.3f} | {r['perplexity']:.2f} | "
              f"{r['perplexity'] / dense_ppl:.2f} | {r['mean_relative_error']:.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
