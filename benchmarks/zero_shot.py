"""Zero-shot accuracy of SmolLM2-135M compressed by each method, through the stock command line and lm-eval.

For each model spec: `optimum-cli oats compress default ...` (skipped when its checkpoint is already there), then
`optimum-cli oats evaluate CHECKPOINT --no-perplexity --limit N` (skipped when its result JSON is already there), so
a stopped run resumes model by model. Two runs with different `--methods` and the same `--output` use two cores.
A spec is a method (`dense`, `magnitude`, `wanda`, `sparsegpt`, `oats`, `hassle`), optionally with block
refinement: `hassle+refine64` compresses with `--refine-steps 64`.

    python benchmarks/zero_shot.py --methods dense wanda sparsegpt oats hassle+refine64 --limit 500
    python benchmarks/zero_shot.py --methods dense wanda sparsegpt oats hassle+refine64 --table-only

The table gives, per task, the metric that enters `zero_shot_mean` (acc_norm where the task has it, else acc) with
lm-eval's standard error; the mean's error is the root of the summed squared errors over 8 (tasks independent).
A second mean leaves out the two yes/no tasks (BoolQ, RTE): a model near the majority-class rate there moves by
several points when compression shifts its yes/no preference, which says little about what it still knows.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from toolkit.provenance import Provenance
from toolkit.zero_shot import score_rows

from optimum_oats.evaluation import ZERO_SHOT_TASKS

BASELINES = ("dense", "magnitude", "wanda", "sparsegpt", "oats", "hassle")
BINARY_TASKS = ("boolq", "rte")  # yes/no tasks where a 135M model scores near the majority-class rate
SPEC = re.compile(r"^(?P<method>[a-z]+)(\+refine(?P<steps>\d+))?$")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["dense", "wanda", "sparsegpt", "oats", "hassle"])
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--rank-ratio", type=float, default=0.1, help="kappa of oats and hassle")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=500, help="documents per task (the whole set when smaller)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path("bench_results/zeroshot"))
    parser.add_argument("--table-only", action="store_true", help="print the table from the stored results")
    args = parser.parse_args()
    for spec in args.methods:
        match = SPEC.match(spec)
        if match is None or match["method"] not in BASELINES or (match["method"] == "dense" and match["steps"]):
            parser.error(f"--methods: {spec!r} is not METHOD or METHOD+refineN with METHOD in {BASELINES}")
    return args


def slug(spec: str) -> str:
    return spec.replace("+", "-")


def cli() -> str:
    """`optimum-cli` of this interpreter's environment."""
    beside = Path(sys.executable).with_name("optimum-cli")
    return str(beside) if beside.exists() else "optimum-cli"


def compress_command(spec: str, args: argparse.Namespace, folder: Path) -> list[str]:
    match = SPEC.match(spec)
    command = [
        cli(), "oats", "compress", "default", "-o", str(folder),
        "--method", match["method"], "--compression-rate", str(args.rate), "--rank-ratio", str(args.rank_ratio),
        "--dataset", "c4", "--num-samples", str(args.num_samples), "--seqlen", str(args.seqlen),
        "--svd", "fast", "--seed", str(args.seed),
    ]  # fmt: skip
    if match["steps"]:
        command += ["--refine-steps", match["steps"]]
    return command


def run_one(spec: str, args: argparse.Namespace) -> None:
    result = args.output / f"{slug(spec)}.json"
    if result.exists():
        print(f"{spec}: {result} exists, skipped", flush=True)
        return
    if spec == "dense":
        model = "default"
    else:
        folder = args.output / "ckpt" / slug(spec)
        if not (folder / "config.json").exists():
            print(f"{spec}: compressing into {folder}", flush=True)
            subprocess.run(compress_command(spec, args, folder), check=True)
        model = str(folder)
    print(f"{spec}: evaluating {model}", flush=True)
    command = [cli(), "oats", "evaluate", model, "--no-perplexity", "--limit", str(args.limit)]
    command += ["--batch-size", str(args.batch_size), "--output", str(result)]
    subprocess.run(command, check=True)


def table(args: argparse.Namespace) -> str:
    results = {}
    for spec in args.methods:
        path = args.output / f"{slug(spec)}.json"
        if path.exists():
            results[spec] = json.loads(path.read_text(encoding="utf-8"))["compressed"]
    if not results:
        return "(no results yet)"
    specs = list(results)
    every_task = range(len(ZERO_SHOT_TASKS))
    multiple_choice = [i for i, task in enumerate(ZERO_SHOT_TASKS) if task not in BINARY_TASKS]
    means = {"mean": every_task, f"mean without {', '.join(BINARY_TASKS)}": multiple_choice}
    lines, values = score_rows(results, ZERO_SHOT_TASKS, means)
    if "dense" in specs and len(values["dense"]) == len(ZERO_SHOT_TASKS):
        dense_mean = sum(values["dense"]) / len(values["dense"])
        deltas = []
        for spec in specs:
            ok = len(values[spec]) == len(ZERO_SHOT_TASKS)
            deltas.append(f"{sum(values[spec]) / len(values[spec]) - dense_mean:+.4f}" if ok else "-")
        lines.append("| Δ mean vs dense | | | " + " | ".join(deltas) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    provenance = Provenance.start()
    if not args.table_only:
        args.output.mkdir(parents=True, exist_ok=True)
        for spec in args.methods:
            run_one(spec, args)
    print(
        f"\nSmolLM2-135M-Instruct, rho = {args.rate}, kappa = {args.rank_ratio} (oats, hassle), calibration "
        f"{args.num_samples} x {args.seqlen} C4 seed {args.seed}, svd fast; lm-eval, first {args.limit} documents "
        f"per task, batch {args.batch_size}, fp32\n{provenance.line()}\n"
    )
    print(table(args))


if __name__ == "__main__":
    main()
