"""Zero-shot accuracy of saved checkpoints through the stock `lm_eval` command line, one task per call, resumable.

Each model is a folder given as NAME=DIR (or `default`: the embedded SmolLM2-135M). Every (model, task) pair is one
`lm_eval --model hf --model_args pretrained=DIR,dtype=float32[,trust_remote_code=True]` call on this package's
offline task files (`--include_path`), with the same limit and batch size for every model; a checkpoint written by
optimum-oats (it has `modeling_oats.py`) is loaded with `trust_remote_code=True`, as README says the stock CLI
must. The scores go to OUTPUT/NAME.json, task by task, so a stopped run resumes where it stopped. `--lm-eval`
picks the executable, so a checkpoint that needs another environment (llm-compressor's compressed-tensors format)
is scored by the same lm-eval version installed there:

    OATS_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/zero_shot_stock.py \\
        --model dense=default hassle-q4=bench_results/zeroshot-q4/ckpt/hassle-0.3-v4-uv8 --limit 500
    OATS_DATA_DIR=../shared/data OMP_NUM_THREADS=1 python benchmarks/zero_shot_stock.py \\
        --model gptq-w4=PEER_CHECKPOINT --lm-eval .venv-peer/bin/lm_eval --limit 500
    python benchmarks/zero_shot_stock.py --model dense hassle-q4 gptq-w4 --table-only

The table gives, per task, acc_norm where the task has it, else acc (the metric of `zero_shot_mean`) with lm-eval's
standard error; the mean's error is the root of the summed squared errors over 8 (tasks independent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from toolkit.zero_shot import headline, score_rows

from optimum_oats.evaluation import ZERO_SHOT_TASKS, lm_eval_tasks_dir, summarize_results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", nargs="+", required=True, help="NAME=DIR (or NAME=default); NAME alone with --table-only"
    )
    parser.add_argument("--tasks", nargs="+", default=list(ZERO_SHOT_TASKS))
    parser.add_argument("--limit", type=int, default=500, help="documents per task (the whole set when smaller)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lm-eval", default=None, help="lm_eval executable (default: the one beside this Python)")
    parser.add_argument("--output", type=Path, default=Path("bench_results/zeroshot-q4"))
    parser.add_argument("--table-only", action="store_true", help="print the table from the stored results")
    return parser.parse_args()


def lm_eval_command(explicit: str | None) -> list[str]:
    if explicit:
        return [explicit]
    beside = Path(sys.executable).with_name("lm_eval")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "lm_eval"]


def model_folder(spec: str) -> str:
    if spec == "default":
        from optimum_oats.integrations.default_model import default_model_path

        return default_model_path()
    return str(Path(spec).resolve())


def run_task(name: str, folder: str, task: str, args: argparse.Namespace) -> dict:
    model_args = f"pretrained={folder},dtype=float32"
    if (Path(folder) / "modeling_oats.py").is_file():
        model_args += ",trust_remote_code=True"
    with tempfile.TemporaryDirectory(prefix=f"zs-{name}-{task}-") as tmp:
        command = lm_eval_command(args.lm_eval) + [
            "--model", "hf",
            "--model_args", model_args,
            "--tasks", task,
            "--device", "cpu",
            "--limit", str(args.limit),
            "--batch_size", str(args.batch_size),
            "--include_path", lm_eval_tasks_dir(),
            "--output_path", tmp,
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        load, start, cpu = os.getloadavg(), time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(command, check=True, env=env)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
        (results_file,) = Path(tmp).rglob("results_*.json")
        raw = json.loads(results_file.read_text(encoding="utf-8"))
    data_file = raw["configs"][task]["dataset_path"]
    if not (Path(os.environ.get("OATS_DATA_DIR", ".")) / data_file).is_file():  # the stock task reads a Hub id
        raise RuntimeError(f"{task} resolved to {data_file!r}, not this package's offline task file")
    return {
        **summarize_results(raw)[task],
        "dataset_path": data_file,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),  # on a shared machine, wall seconds mostly measure the neighbours
        "loadavg_before": [round(x, 2) for x in load],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "lm_eval_version": raw.get("lm_eval_version"),
        "transformers_version": raw.get("transformers_version"),
        "model_args": model_args,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_model(spec: str, args: argparse.Namespace) -> None:
    name, _, where = spec.partition("=")
    if not where:
        raise SystemExit(f"--model {spec!r}: expected NAME=DIR")
    path = args.output / f"{name}.json"
    stored = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    folder = model_folder(where)
    stored.update(model=where, folder=folder, limit=args.limit, batch_size=args.batch_size, machine=platform.machine())
    tasks = stored.setdefault("tasks", {})
    for task in args.tasks:
        if task in tasks:
            print(f"{name} {task}: stored, skipped", flush=True)
            continue
        print(f"{name} {task}: lm_eval on {folder}", flush=True)
        tasks[task] = run_task(name, folder, task, args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
        print(f"{name} {task}: {headline(tasks[task])} in {tasks[task]['seconds']} s", flush=True)


def table(args: argparse.Namespace) -> str:
    names = [spec.partition("=")[0] for spec in args.model]
    results = {}
    for name in names:
        path = args.output / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text(encoding="utf-8"))["tasks"]
    lines, _ = score_rows(results, args.tasks, {"mean": range(len(args.tasks))})
    for key in ("seconds", "cpu_seconds"):
        cells = [
            f"{sum(t[key] for t in results[n].values()):.0f}" if all(key in t for t in results[n].values()) else "-"
            for n in results
        ]
        lines.append(f"| {key.replace('_', ' ')} (all tasks) | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if not args.table_only:
        for spec in args.model:
            run_model(spec, args)
    print(table(args))


if __name__ == "__main__":
    main()
