"""Compression wall time and peak memory: exact vs fast OATS solver, with Wanda as the calibration-only floor.

Every configuration runs in a fresh subprocess (so peak RSS is its own) on the first `--blocks` decoder blocks of
SmolLM2-135M-Instruct, and the configurations alternate within each repeat so that load on this shared machine hits
them alike. Wanda does the same two calibration passes per block as OATS but no iterative solve, so
`solver s = wall - wanda wall` isolates the part `svd="fast"` speeds up; the whole-model figure scales the per-block
times to all 30 blocks.

    OATS_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/compress_speed.py --blocks 3 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from toolkit.data import data_root
from toolkit.provenance import Provenance

CONFIGS = {
    "wanda": {"method": "wanda"},
    "oats-fast": {"method": "oats", "svd": "fast"},
    "oats-exact": {"method": "oats", "svd": "exact"},
    "sparsegpt": {"method": "sparsegpt"},
    "hassle": {"method": "hassle"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=3, help="compress only the first N decoder blocks")
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    """Compress the truncated model once with one configuration; print a JSON line with the measurements."""
    import torch
    from toolkit.models import smollm2_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_oats import OATSConfig, compress, compression_report

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    model.model.layers = torch.nn.ModuleList(model.model.layers[: args.blocks])
    model.config.num_hidden_layers = args.blocks
    config = OATSConfig(
        compression_rate=args.rate,
        rank_ratio=0.25,  # the kappa of the runs recorded in BENCHMARKS.md (the library default is now 0.1)
        dataset="c4",
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        num_iterations=args.iterations,
        seed=0,
        **CONFIGS[args.worker],
    )
    start = time.perf_counter()
    compress(model, config, AutoTokenizer.from_pretrained(path))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    error = compression_report(model).mean_relative_error
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "mean_relative_error": error}))


def run_config(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--blocks", str(args.blocks), "--rate", str(args.rate)]
    command += ["--num-samples", str(args.num_samples), "--seqlen", str(args.seqlen)]
    command += ["--iterations", str(args.iterations)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    provenance = Provenance.start()
    data_root(export=True)  # the workers calibrate on C4 from there
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    for repeat in range(args.repeats):
        order = args.configs if repeat % 2 == 0 else list(reversed(args.configs))
        for name in order:
            runs[name].append(run_config(name, args))
            print(f"repeat {repeat}: {name} {runs[name][-1]}", file=sys.stderr)

    median = {name: statistics.median(r["seconds"] for r in results) for name, results in runs.items()}
    floor = median.get("wanda", 0.0)
    print(
        f"\n## Compression time: SmolLM2-135M-Instruct, first {args.blocks} of 30 blocks, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n{provenance.line()}"
    )
    print(
        f"rho={args.rate}, calibration {args.num_samples} x {args.seqlen} C4 tokens, {args.iterations} iterations, "
        f"median of {args.repeats} fresh-process run(s)\n"
    )
    print(
        "| config | wall s | solver s (wall - wanda) | wall vs exact | solver vs exact | est. 30 blocks s | "
        "peak RSS MB | mean rel. error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    exact = median.get("oats-exact")
    for name, results in runs.items():
        wall = median[name]
        solver = max(wall - floor, 0.0)
        wall_ratio = f"{exact / wall:.1f}x" if exact else "-"
        solver_ratio = f"{(exact - floor) / solver:.1f}x" if exact and solver > 0 and name != "wanda" else "-"
        peak = max(r["peak_rss_mb"] for r in results)
        error = results[0]["mean_relative_error"]
        whole = wall * 30 / args.blocks
        print(
            f"| {name} | {wall:.1f} | {solver:.1f} | {wall_ratio} | {solver_ratio} | {whole:.0f} | {peak:.0f} | "
            f"{error:.4f} |"
        )
    if "sparsegpt" in runs and "hassle" in runs:
        peak = {name: max(r["peak_rss_mb"] for r in runs[name]) for name in ("sparsegpt", "hassle")}
        print(
            f"\nhassle / sparsegpt wall time {median['hassle'] / median['sparsegpt']:.2f}x; peak RSS "
            f"{peak['hassle'] - peak['sparsegpt']:+.0f} MB"
        )


if __name__ == "__main__":
    main()
