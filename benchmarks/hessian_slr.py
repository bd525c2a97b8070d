"""Per-matrix output error of `method="hassle"` against SparseGPT and OATS on real SmolLM2-135M layers (issue 17).

For each selected layer the inputs' Hessian `H = 2 X^T X / n` comes from C4 windows run through the *dense* model
(forward hooks), and every method decomposes the same weight at the same parameter budget; the number reported is
the relative output error `tr(Δ H Δ^T) / tr(W H W^T)` under the damped `H` that SparseGPT uses (lower is better),
summed over the layers of a rate, plus the wall time. It measures what the new method optimises, to choose its
iteration count and start; the perplexity protocol is `benchmarks/quality.py`.

    OMP_NUM_THREADS=1 OATS_DATA_DIR=../shared/data python benchmarks/hessian_slr.py
    OMP_NUM_THREADS=1 python benchmarks/hessian_slr.py --rates 0.7 --layers 2 15 28 --iterations 1 2 4 8
    python benchmarks/hessian_slr.py --device cuda --rates 0.6 --iterations 2 --refit-steps 10 --profile

`--profile` adds where the time goes: each method's total and hassle's phases (S-step, CG refit, L-step,
objective; labelled in `optimum_oats.algorithms.hessian_slr`), then the operators that take the most time.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from collections import defaultdict

import torch
from toolkit.calibration import c4_token_windows, layer_statistics
from toolkit.data import data_root
from toolkit.models import PROJECTIONS, block_layer_names, checked_device, load_causal_lm, load_tokenizer
from toolkit.provenance import Provenance
from torch.profiler import ProfilerActivity, profile, record_function

from optimum_oats.algorithms import HESSIAN, hessian_sparse_low_rank, layer_budget, oats_decompose, sparsegpt_prune
from optimum_oats.algorithms.hessian_slr import hessian_metric, hessian_objective


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    parser.add_argument("--rank-ratio", type=float, default=0.1, help="κ (OATSConfig's default)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 15, 28], help="decoder blocks to sample")
    parser.add_argument("--projections", nargs="+", default=list(PROJECTIONS), choices=PROJECTIONS)
    parser.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 3], help="hassle alternations")
    parser.add_argument("--refit-steps", type=int, nargs="+", default=[0, 10], help="CG steps per S-step")
    parser.add_argument("--oats-iterations", type=int, default=80)
    parser.add_argument("--num-sequences", type=int, default=8, help="C4 windows for the Hessians")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu", help="where the decompositions run, e.g. cuda (Hessians: CPU)")
    parser.add_argument("--profile", action="store_true", help="print the time per method, hassle phase and operator")
    args = parser.parse_args()
    args.device = checked_device(parser, args.device)
    return args


def clock(device: torch.device) -> float:
    """`time.perf_counter()` once the device's queued work has finished (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def print_profile(prof, device: torch.device) -> None:
    """Totals of the labelled regions (methods, hassle's phases), then the 15 operators with most self time."""
    on_gpu = device.type == "cuda"
    events = prof.key_averages()
    print("\n### Where the time goes (torch.profiler; the profiler's own overhead included)\n")
    print("| region | calls | CPU s | GPU s |" if on_gpu else "| region | calls | CPU s |")
    print("|---|---:|---:|---:|" if on_gpu else "|---|---:|---:|")
    for event in sorted(events, key=lambda e: e.key):
        if event.key.startswith(("bench/", "hassle/")):
            row = f"| {event.key} | {event.count} | {event.cpu_time_total / 1e6:.2f} |"
            print(row + (f" {event.device_time_total / 1e6:.2f} |" if on_gpu else ""))
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print()
    print(events.table(sort_by=sort_by, row_limit=15, max_name_column_width=40))


def main() -> None:
    args = parse_args()
    provenance = Provenance.start()
    torch.manual_seed(0)
    model = load_causal_lm(args.model, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model)
    names = block_layer_names(args.layers, args.projections)
    start = time.perf_counter()
    windows = c4_token_windows(tokenizer, args.num_sequences, args.seqlen, data_root())
    stats = layer_statistics(model, names, windows, HESSIAN)
    print(
        f"# Hessians of {len(names)} layers "
        f"in {time.perf_counter() - start:.0f} s "
        f"({args.num_sequences} x {args.seqlen} C4 tokens, dense model)"
    )
    modules = dict(model.named_modules())
    device = args.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) if args.profile else contextlib.nullcontext() as prof:
        decompose_all(args, modules, names, stats)
    if args.profile:
        print_profile(prof, device)
    print(f"\n{provenance.line()}")


def decompose_all(args, modules, names, stats) -> None:
    """Every method on every layer at every rate; prints one table per rate."""
    device = args.device
    totals: dict[tuple[float, str], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # error, energy, seconds
    for rate in args.rates:
        for name in names:
            weight = modules[name].weight.detach().float().to(device)
            H = stats[name].to(device)
            d_out, d_in = weight.shape
            budget = layer_budget(d_out, d_in, rate, args.rank_ratio)
            sparsity = 1 - budget.keep_per_row / d_in
            damped = hessian_metric(H).hessian()
            energy = hessian_objective(weight, damped)

            def record(label, approx, seconds, rate=rate, weight=weight, damped=damped, energy=energy) -> None:
                cell = totals[(rate, label)]
                cell[0] += hessian_objective(weight - approx, damped)
                cell[1] += energy
                cell[2] += seconds

            t = clock(device)
            with record_function("bench/sparsegpt"):
                pruned = sparsegpt_prune(weight, H, sparsity=rate)
            record("sparsegpt (all budget to S)", pruned, clock(device) - t)
            for steps in args.refit_steps:
                if steps:
                    t = clock(device)
                    with record_function("bench/sparsegpt+refit"):
                        out = hessian_sparse_low_rank(
                            weight, H, rank=0, sparsity=rate, iterations=1, refit_steps=steps
                        )
                    record(f"sparsegpt + {steps} CG refit steps (hassle, rank 0)", out.sparse, clock(device) - t)
            t = clock(device)
            norms = (H.diagonal().clamp_min(0) / 2).sqrt()
            with record_function("bench/oats"):
                oats = oats_decompose(
                    weight,
                    norms,
                    rank=budget.rank,
                    keep_per_row=budget.keep_per_row,
                    iterations=args.oats_iterations,
                    solver="fast",
                )
            oats_s = clock(device) - t
            record("oats (fast)", oats.sparse + oats.lowrank_u @ oats.lowrank_v, oats_s)
            starts = (("oats start", oats), ("L=0 start", None))
            for iterations, steps, (start_label, warm) in itertools.product(args.iterations, args.refit_steps, starts):
                t = clock(device)
                with record_function(f"bench/hassle ({start_label})"):
                    out = hessian_sparse_low_rank(
                        weight,
                        H,
                        rank=budget.rank,
                        sparsity=sparsity,
                        iterations=iterations,
                        warm_start=warm,
                        refit_steps=steps,
                    )
                seconds = clock(device) - t + (oats_s if warm is not None else 0.0)
                approx = out.sparse + (out.lowrank_u @ out.lowrank_v if out.lowrank_u is not None else 0)
                record(f"hassle, {start_label}, {iterations} it., {steps} CG steps", approx, seconds)
        print(f"\n### ρ = {rate}, κ = {args.rank_ratio}, blocks {args.layers}, {len(names)} matrices\n")
        print("| method | rel. output error Σ tr(ΔHΔᵀ) / Σ tr(WHWᵀ) | vs SparseGPT | seconds |")
        print("|---|---:|---:|---:|")
        base = totals[(rate, "sparsegpt (all budget to S)")]
        for (r, label), (error, energy, seconds) in totals.items():
            if r == rate:
                print(f"| {label} | {error / energy:.5f} | {error / base[0]:.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
