"""Peak memory of one layer's compression, per method: what an algorithm allocates above what the engine holds.

Each (shape, method) runs in a fresh process through the registry (`ALGORITHMS[method].run`, so hassle includes its
OATS warm start) on a random weight and a correlated-input Hessian; the peak resident memory above the resident
memory at the call (`VmHWM` reset through `/proc/self/clear_refs`) is the algorithm's own working set. glibc keeps
freed heap memory and raises its mmap threshold as large blocks are freed, which makes a process's peak depend on
its allocation history (±30 MB between identical whole-model runs); the workers therefore run with
`MALLOC_MMAP_THRESHOLD_=65536`, so that every matrix is mapped and unmapped and the resident memory follows the
live tensors. Linux only.

    python benchmarks/layer_memory.py                       # SmolLM2-135M's four layer shapes, rho = 0.5
    python benchmarks/layer_memory.py --shapes 4096x14336   # a Llama-3-8B down_proj
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from toolkit.provenance import Provenance

SMOLLM2_SHAPES = ["576x576", "192x576", "1536x576", "576x1536"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SMOLLM2_SHAPES, help="d_out x d_in")
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "oats", "hassle"])
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--rank-ratio", type=float, default=0.1)
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def _status(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def worker(shape: str, method: str, args: argparse.Namespace) -> None:
    import torch

    from optimum_oats import OATSConfig
    from optimum_oats.algorithms import ALGORITHMS, HESSIAN, INPUT_NORMS, layer_budget

    torch.set_num_threads(1)
    d_out, d_in = (int(n) for n in shape.split("x"))
    generator = torch.Generator().manual_seed(0)
    weight = 0.05 * torch.randn(d_out, d_in, generator=generator)
    mix = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=generator) / d_in**0.5
    hessian = mix.T @ mix  # the second moment of inputs `z @ mix` with z ~ N(0, I)
    del mix
    stats = {HESSIAN: hessian, INPUT_NORMS: hessian.diagonal().sqrt()}
    budget = layer_budget(d_out, d_in, args.rate, args.rank_ratio)
    settings = OATSConfig(method=method, compression_rate=args.rate, rank_ratio=args.rank_ratio).method_settings
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current resident memory
    start = _status("VmRSS")
    ALGORITHMS[method].run(weight, stats, budget, settings)
    print(json.dumps({"peak_mb": _status("VmHWM") - start}))


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(*args.worker, args)
        return
    provenance = Provenance.start()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    print(
        f"\n### Peak memory above the call of one layer's compression (MB), rho={args.rate}, "
        f"kappa={args.rank_ratio}, fresh process per cell, MALLOC_MMAP_THRESHOLD_=65536\n"
    )
    print("| shape | float32 matrix MB | Hessian MB | " + " | ".join(args.methods) + " | hassle - sparsegpt |")
    print("|---|---|---|" + "---|" * len(args.methods) + "---|")
    for shape in args.shapes:
        d_out, d_in = (int(n) for n in shape.split("x"))
        peaks = {}
        for method in args.methods:
            command = [sys.executable, __file__, "--worker", shape, method, "--rate", str(args.rate)]
            command += ["--rank-ratio", str(args.rank_ratio)]
            done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            peaks[method] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
        difference = f"{peaks['hassle'] - peaks['sparsegpt']:+.1f}" if {"hassle", "sparsegpt"} <= set(peaks) else "-"
        cells = " | ".join(f"{peaks[method]:.1f}" for method in args.methods)
        print(f"| {shape} | {d_out * d_in * 4 / 2**20:.1f} | {d_in * d_in * 4 / 2**20:.1f} | {cells} | {difference} |")
    print(f"\n{provenance.line()}")


if __name__ == "__main__":
    main()
