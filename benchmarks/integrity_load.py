"""What checking the integrity records costs beside the load itself (issue 33), on a compressed checkpoint.

    python benchmarks/integrity_load.py DIR [--repeats 5] [--threads 1] [--processes 3] [--saves 3]

DIR is a compressed checkpoint (e.g. `optimum-oats compress default -o DIR`, SmolLM2-135M). One that has no
records yet (saved before them) is loaded and saved again into a temporary folder first, which adds them.
Each repetition times, in alternating order, `from_pretrained(DIR)` with the check (the default) and with
`oats_verify=False`, plus the check alone (`verify_files`: sha256 of every tensor). One untimed load first, so the
file is in the page cache for all of them (the load and the check read the same bytes; from a cold cache the
first reader pays the disk read, whichever it is). With `--processes N`, also N fresh Python processes per
variant that import the package, load and run one forward pass (what a script or `oats evaluate` pays), timed from
outside. With `--saves N`, also N `save_pretrained` calls (which record each shard as it is written) and N
`record_of_tensors(model.state_dict())` calls alone (what the records add to a save: a sha256 of every tensor).
Prints one JSON line per repetition, then medians as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from toolkit.provenance import Provenance
from transformers import AutoModelForCausalLM

import optimum_oats  # noqa: F401  (registers the "oats" method)
from optimum_oats.integrations.integrity import read_record, record_of_tensors, verify_files


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _with_records(directory: Path, scratch: Path) -> Path:
    files = sorted(directory.glob("*.safetensors"))
    if all(read_record(f) is not None for f in files):
        return directory
    print(f"{directory} has no integrity records: saving it again into {scratch}", file=sys.stderr)
    AutoModelForCausalLM.from_pretrained(directory, oats_verify=False).save_pretrained(scratch)
    return scratch


_PROCESS = """
import torch, optimum_oats
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({directory!r}, oats_verify={verify})
with torch.no_grad():
    model(torch.tensor([[1, 2, 3, 4]]))
"""


def _process_times(directory: Path, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"process_verified": [], "process_unverified": []}
    for repeat in range(repeats):
        for name in sorted(times, reverse=bool(repeat % 2)):
            code = _PROCESS.format(directory=str(directory), verify=name == "process_verified")
            times[name].append(_timed(lambda c=code: subprocess.run([sys.executable, "-c", c], check=True)))
        print(json.dumps({"process_repeat": repeat, **{k: round(v[-1], 3) for k, v in times.items()}}))
    return {name: statistics.median(values) for name, values in times.items()}


def _save_times(directory: Path, scratch: Path, repeats: int) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(directory, oats_verify=False)
    times: dict[str, list[float]] = {"save_pretrained": [], "record_of_tensors": []}
    for repeat in range(repeats):
        target = scratch / f"save{repeat}"
        times["save_pretrained"].append(_timed(lambda t=target: model.save_pretrained(t)))
        times["record_of_tensors"].append(_timed(lambda: record_of_tensors(model.state_dict())))
        print(json.dumps({"save_repeat": repeat, **{k: round(v[-1], 3) for k, v in times.items()}}))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (hashing uses its own thread pool)")
    parser.add_argument("--processes", type=int, default=0, help="fresh-process repetitions per variant (0: none)")
    parser.add_argument("--saves", type=int, default=0, help="save_pretrained / write_records repetitions (0: none)")
    args = parser.parse_args()
    provenance = Provenance.start()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        directory = _with_records(args.directory, Path(scratch) / "recorded")
        files = sorted(directory.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        AutoModelForCausalLM.from_pretrained(directory)  # warm the page cache
        variants = {
            "load_verified": lambda: AutoModelForCausalLM.from_pretrained(directory),
            "load_unverified": lambda: AutoModelForCausalLM.from_pretrained(directory, oats_verify=False),
            "verify_only": lambda: verify_files(files),
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            order = list(variants)[repeat % 3 :] + list(variants)[: repeat % 3]
            for name in order:
                times[name].append(_timed(variants[name]))
            print(json.dumps({"repeat": repeat, **{k: round(v[-1], 4) for k, v in times.items()}}))
        processes = _process_times(directory, args.processes) if args.processes else {}
        saves = _save_times(directory, Path(scratch), args.saves) if args.saves else {}
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\ncheckpoint: {args.directory} ({size / 1e6:.1f} MB in {len(files)} file(s)), {args.repeats} repeats, ")
    print(f"torch threads {args.threads}, hashing threads {min(8, os.cpu_count() or 1)}, page cache warm\n")
    print("| load, verified (default) | load, `oats_verify=False` | sha256 check alone | check / unverified load |")
    print("|---|---|---|---|")
    ratio = median["verify_only"] / median["load_unverified"]
    print(
        f"| {median['load_verified']:.3f} s | {median['load_unverified']:.3f} s | {median['verify_only']:.3f} s "
        f"({size / median['verify_only'] / 1e9:.2f} GB/s) | {ratio:.0%} |"
    )
    if processes:
        print("\n| fresh process: import + load + 1 forward, verified | same, `oats_verify=False` |\n|---|---|")
        print(f"| {processes['process_verified']:.2f} s | {processes['process_unverified']:.2f} s |")
    if saves:
        print("\n| `save_pretrained` (records included) | the records alone (`record_of_tensors`) |\n|---|---|")
        print(f"| {saves['save_pretrained']:.2f} s | {saves['record_of_tensors']:.2f} s |")
    print(f"\n{provenance.line()}")


if __name__ == "__main__":
    main()
