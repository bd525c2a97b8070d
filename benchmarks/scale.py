"""Scaling benchmarks on SmolLM2-135M: peak memory of offloaded compression, and the torchrun speed-up.

    python benchmarks/scale.py memory        # peak RSS: model in memory vs every block offloaded to disk
    python benchmarks/scale.py distributed   # wall time: 1 process vs `torchrun --nproc_per_node 2`

Every configuration runs in a fresh process (`ru_maxrss` is a per-process high-water mark) with one thread per
process (`OMP_NUM_THREADS=1`). Each job prints the SHA-256 of all its compressed weights, so the table also shows
whether offloaded / distributed results equal the in-memory single-process ones bit for bit.

`memory`: RSS after importing torch/transformers/optimum_oats and reading the tokenizer (before the model loads),
RSS once the model is loaded, the peak RSS while `compress()` runs (the kernel's high-water mark is reset just
before it), that peak minus the RSS after imports (what the model and the compression cost), and the whole
process's `ru_maxrss` (which also counts loading). The dense size is the model's parameter bytes (tied embeddings
counted once).

`--blocks N` keeps only the first N blocks of the model (a shorter model: calibration and compression see just
those), to keep a run short. `distributed` times `compress()` alone, on rank 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolkit.data import data_root
from toolkit.provenance import Provenance

HERE = Path(__file__).resolve()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> None:
    """Restart the kernel's high-water mark (VmHWM) from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _peak_since_reset_mb() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def job(args: argparse.Namespace) -> None:
    """One compression in this process; prints a JSON line."""
    import torch
    import torch.distributed as dist
    from toolkit.models import smollm2_path
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_oats import OATSConfig, compress
    from optimum_oats.engine.blocks import find_main_block_stack, set_module
    from optimum_oats.engine.offload import _offload_hook, offloading_device_map
    from optimum_oats.nn import LinearSparseLowRank

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    baseline = _current_rss_mb()
    with tempfile.TemporaryDirectory() as offload_folder:
        if args.mode == "disk":
            device_map = offloading_device_map(path, "cpu", "disk")
            model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=offload_folder)
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
        loaded = _current_rss_mb()
        blocks_name, blocks = find_main_block_stack(model)
        if args.blocks:  # keep the first N blocks only: calibration and compression both see just those
            blocks = nn.ModuleList(list(blocks)[: args.blocks])
            set_module(model, blocks_name, blocks)
            model.config.num_hidden_layers = len(blocks)
        dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        config = OATSConfig(
            compression_rate=0.5,
            rank_ratio=0.25,  # the kappa of the runs recorded in BENCHMARKS.md (the library default is now 0.1)
            method=args.method,
            svd=args.svd,
            num_iterations=args.num_iterations,
            num_samples=args.num_samples,
            seqlen=args.seqlen,
            dataset=args.dataset,
        )
        _reset_peak_rss()
        start = time.perf_counter()
        compress(model, config, tokenizer, progress=False)
        seconds = time.perf_counter() - start
        compress_peak = _peak_since_reset_mb()
        peak = _rss_mb()
        digest = hashlib.sha256()
        for name, module in model.named_modules():
            if isinstance(module, LinearSparseLowRank):
                hook = _offload_hook(module)
                for key, tensor in module.state_dict().items():
                    if tensor.device.type == "meta":  # offloaded again: read it back from the weights map
                        tensor = hook.weights_map[key]
                    digest.update(
                        name.encode() + key.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes()
                    )
    if world_size == 1 or dist.get_rank() == 0:
        print(
            json.dumps(
                {
                    "mode": args.mode,
                    "processes": world_size,
                    "blocks": args.blocks or len(blocks),
                    "seconds": round(seconds, 1),
                    "baseline_mb": round(baseline),
                    "after_load_mb": round(loaded),
                    "peak_mb": round(peak),
                    "compress_peak_mb": round(compress_peak),
                    "dense_mb": round(dense_bytes / 2**20),
                    "weights_sha256": digest.hexdigest()[:16],
                }
            ),
            flush=True,
        )
    if world_size > 1:
        dist.destroy_process_group()


def _spawn(job_args: list[str], processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    )
    result = subprocess.run(
        [sys.executable, *launcher, str(HERE), "_job", *job_args], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-4000:])
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "distributed", "_job"])
    parser.add_argument("--mode", choices=["memory", "disk"], default="memory", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="oats")
    parser.add_argument("--svd", default="fast")
    parser.add_argument("--num-iterations", type=int, default=80)
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--blocks", type=int, default=None, help="keep only the first N blocks of the model")
    args = parser.parse_args()
    if args.what == "_job":
        return job(args)
    provenance = Provenance.start()
    data_root(export=True)  # the jobs calibrate on `--dataset` from there
    common = [
        f"--method={args.method}",
        f"--svd={args.svd}",
        f"--num-iterations={args.num_iterations}",
        f"--num-samples={args.num_samples}",
        f"--seqlen={args.seqlen}",
        f"--dataset={args.dataset}",
    ]
    if args.blocks:
        common.append(f"--blocks={args.blocks}")
    print(
        f"# {args.what}: SmolLM2-135M fp32, rho=0.5, {args.method} svd={args.svd} iterations={args.num_iterations}, "
        f"{args.num_samples}x{args.seqlen} {args.dataset}, blocks={args.blocks or 'all'}, "
        f"OMP_NUM_THREADS=1"
    )
    if args.what == "memory":
        rows = [_spawn([*common, "--mode=memory"], 1), _spawn([*common, "--mode=disk"], 1)]
        print(
            "| model placement | dense size | RSS after imports | RSS after load | peak RSS in compress() "
            "| peak in compress() - after imports | process peak (ru_maxrss) | compress time | weights sha256 |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            label = "in memory" if row["mode"] == "memory" else "every block offloaded to disk"
            print(
                f"| {label} | {row['dense_mb']} MB | {row['baseline_mb']} MB | {row['after_load_mb']} MB | "
                f"{row['compress_peak_mb']} MB | {row['compress_peak_mb'] - row['baseline_mb']} MB | "
                f"{row['peak_mb']} MB | {row['seconds']} s | {row['weights_sha256']} |"
            )
    else:
        rows = [_spawn([*common, "--mode=memory"], 1), _spawn([*common, "--mode=memory"], 2)]
        print("| processes | compress time | speed-up | weights sha256 |")
        print("|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['processes']} | {row['seconds']} s | {rows[0]['seconds'] / row['seconds']:.2f}x | "
                f"{row['weights_sha256']} |"
            )
    print(provenance.line())


if __name__ == "__main__":
    main()
