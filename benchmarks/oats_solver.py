"""OATS solver benchmark: `svd="exact"` vs `svd="fast"` on real SmolLM2-135M weight matrices, per shape.

Input norms `D` are real: a few C4 sequences from `$OATS_DATA_DIR/c4/c4_sample.jsonl` are run through the dense
model and collected by the library's statistics hooks (`D_j = ||X_j||_2`, summed in float64 as `compress()` does).
Every selected matrix is decomposed by both solvers at the OATS budget for each rate; the error is the scaled
relative error `||(W - S - L) D||_F / ||W D||_F`. Times are summed over the matrices of a shape; errors are
averaged, `Δ` is the per-matrix relative error difference `fast / exact - 1` (mean and the worst, i.e. largest,
over the matrices).

With `--noise` the exact solver is also run on `W (1 + 1e-6 ε)`; the same `Δ` of that run (`noise Δ`) is the
exact solver's own sensitivity (OATS's thresholding path is chaotic), the yardstick for the fast one's `Δ`.

    OMP_NUM_THREADS=1 python benchmarks/oats_solver.py --noise --json solver.json
    python benchmarks/oats_solver.py --table-only --json solver.json    # reprint a stored run
    python benchmarks/oats_solver.py --iterations 40 --rates 0.5 --layers 15
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from toolkit.calibration import c4_token_windows, layer_statistics
from toolkit.data import data_root
from toolkit.models import PROJECTIONS, block_layer_names, load_causal_lm, load_tokenizer
from toolkit.provenance import Provenance

from optimum_oats.algorithms import INPUT_NORMS, layer_budget, oats_decompose
from optimum_oats.config import parse_nm
from optimum_oats.utils.files import atomic_write_json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--sparsity-pattern", default="unstructured", help='"unstructured" or "N:M", e.g. "2:8"')
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 15, 28], help="decoder blocks to sample")
    parser.add_argument("--projections", nargs="+", default=list(PROJECTIONS), choices=PROJECTIONS)
    parser.add_argument("--tol", type=float, default=None, help="fast solver's early-stop tolerance (its default)")
    parser.add_argument("--noise", action="store_true", help="also measure the exact solver's own sensitivity")
    parser.add_argument("--num-sequences", type=int, default=8, help="C4 sequences for the input norms")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="seeds the --noise perturbation")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--json", default=None, help="also write every per-matrix result to this file")
    parser.add_argument("--table-only", action="store_true", help="print the table from --json, compute nothing")
    return parser.parse_args()


def scaled_error(weight: torch.Tensor, out, norms: torch.Tensor) -> float:
    approx = out.sparse + out.lowrank_u @ out.lowrank_v
    return float(((weight - approx) * norms).norm() / (weight * norms).norm())


def timed(*args, **kwargs):
    """`oats_decompose(*args, **kwargs)` and its wall time."""
    start = time.perf_counter()
    out = oats_decompose(*args, **kwargs)
    return out, time.perf_counter() - start


def run(args: argparse.Namespace, nm: tuple[int, int] | None) -> list[dict]:
    """Decompose every selected matrix at every rate with both solvers; one result per (matrix, rate)."""
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=torch.float32).eval()
    modules = dict(model.named_modules())
    names = {name: modules[name] for name in block_layer_names(args.layers, args.projections)}
    windows = c4_token_windows(tokenizer, args.num_sequences, args.seqlen, data_root())
    norms = layer_statistics(model, list(names), windows, INPUT_NORMS)

    results = []
    for name, linear in names.items():
        weight = linear.weight.detach().float()
        d_out, d_in = weight.shape
        for rate in args.rates:
            budget = layer_budget(d_out, d_in, rate, args.rank_ratio, nm)
            kwargs = dict(rank=budget.rank, keep_per_row=budget.keep_per_row, nm=nm, iterations=args.iterations)
            exact, exact_s = timed(weight, norms[name], **kwargs)
            fast, fast_s = timed(weight, norms[name], solver="fast", tol=args.tol, **kwargs)
            result = {
                "name": name,
                "shape": [d_out, d_in],
                "rate": rate,
                "rank": budget.rank,
                "exact_s": exact_s,
                "fast_s": fast_s,
                "exact_err": scaled_error(weight, exact, norms[name]),
                "fast_err": scaled_error(weight, fast, norms[name]),
                "iterations": fast.iterations,
            }
            if args.noise:
                g = torch.Generator().manual_seed(args.seed)
                perturbed = weight * (1 + 1e-6 * torch.randn(weight.shape, generator=g))
                result["noise_err"] = scaled_error(
                    weight, oats_decompose(perturbed, norms[name], **kwargs), norms[name]
                )
            results.append(result)
            print(json.dumps(result), flush=True)
    return results


def main() -> None:
    args = parse_args()
    provenance = Provenance.start()
    nm = parse_nm(args.sparsity_pattern)
    if nm is not None:  # N:M fixes the sparse part's density: the rate plays no role
        args.rates = args.rates[:1]
    if args.table_only:
        stored = json.loads(Path(args.json).read_text())
        settings, results = stored["settings"], stored["results"]
    else:
        settings = {
            "layers": args.layers,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "rank_ratio": args.rank_ratio,
            "pattern": args.sparsity_pattern,
            "iterations": args.iterations,
            "tol": args.tol,
            "num_sequences": args.num_sequences,
            "seqlen": args.seqlen,
        }
        results = run(args, nm)
        if args.json:
            atomic_write_json(args.json, {"settings": settings, "results": results}, indent=1)
    rows: dict[tuple, list[dict]] = defaultdict(list)
    for result in results:
        rows[(*result["shape"], result["rate"])].append(result)
    noise = any("noise_err" in result for result in results)

    s = settings
    print(
        f"\n## OATS solver: SmolLM2-135M-Instruct blocks {s['layers']}, {s['machine']}, {s['threads']} threads, "
        f"torch {s['torch']}"
    )
    print(
        f"kappa={s['rank_ratio']}, pattern={s['pattern']}, {s['iterations']} iterations max, fast tol="
        f"{'default' if s['tol'] is None else s['tol']}; D from {s['num_sequences']} x {s['seqlen']} C4 tokens\n"
    )
    header = " noise Δ mean | noise Δ worst |" if noise else ""
    print(
        f"| shape | rho | rank | matrices | exact s | fast s | speed-up | exact err | fast err | Δ mean | Δ worst |"
        f"{header} fast iterations |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if noise else "") + "---|")
    for (d_out, d_in, rate), group in sorted(rows.items()):
        exact_s, fast_s = sum(r["exact_s"] for r in group), sum(r["fast_s"] for r in group)
        deltas = [r["fast_err"] / r["exact_err"] - 1 for r in group]
        iterations = [r["iterations"] for r in group]
        its = f"{min(iterations)}" if min(iterations) == max(iterations) else f"{min(iterations)}–{max(iterations)}"
        label = rate if s["pattern"] == "unstructured" else s["pattern"]
        line = (
            f"| {d_out}x{d_in} | {label} | {group[0]['rank']} | {len(group)} | {exact_s:.2f} | {fast_s:.2f} | "
            f"{exact_s / fast_s:.1f}x | {sum(r['exact_err'] for r in group) / len(group):.5f} | "
            f"{sum(r['fast_err'] for r in group) / len(group):.5f} | {sum(deltas) / len(deltas):+.3%} | "
            f"{max(deltas):+.3%} |"
        )
        if noise:
            drift = [r["noise_err"] / r["exact_err"] - 1 for r in group]
            line += f" {sum(drift) / len(drift):+.3%} | {max(drift):+.3%} |"
        print(line + f" {its} |")
    print(f"\n{provenance.line()}")


if __name__ == "__main__":
    main()
