"""Bits per weight of a compressed SmolLM2-135M before compressing it: the OATS budget rule and the storage format.

For every compression rate ρ, value bits and U, V bits, the block layers' budget (`layer_budget`: rank and kept values
per row at κ) is stored as `storage_bits` counts it (packed codes, one fp16 scale per group of columns, 1-bit mask,
factors), over the dense weight count. A compressed run's own number (`compression_report(model).bits_per_weight`)
can differ slightly: SparseGPT's and hassle's joint masks keep `int(numel · ρ)` per 128-column block, not exactly the
per-row budget. Float parts count 16 bits (bf16); the model's shapes come from its config (no weights are read).

    python benchmarks/bits_budget.py --rates 0.3 0.4 0.5 --value-bits 16 8 4 3 --lowrank-bits 8 --group-size 128
"""

from __future__ import annotations

import argparse

from toolkit.models import llama_block_shapes, smollm2_path
from toolkit.provenance import Provenance
from transformers import AutoConfig

from optimum_oats.algorithms import layer_budget
from optimum_oats.utils.counting import storage_bits

# How many layers of each shape one Llama-style block holds (q, o; k, v; gate, up; down).
COPIES = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}


def block_shapes(config) -> list[tuple[int, int]]:
    """`(out_features, in_features)` of one Llama-style block's seven projections."""
    shapes = llama_block_shapes(config.to_dict())
    return [shapes[name] for name, copies in COPIES.items() for _ in range(copies)]


def bits_per_weight(shapes, rate: float, rank_ratio: float, value_bits: int, lowrank_bits: int, group: int) -> float:
    stored = dense = 0
    for out_features, in_features in shapes:
        budget = layer_budget(out_features, in_features, rate, rank_ratio)
        stored += storage_bits(
            budget.keep_per_row * out_features,
            budget.rank,
            in_features,
            out_features,
            value_bits=value_bits,
            lowrank_bits=lowrank_bits,
            group_size=group,
        )
        dense += out_features * in_features
    return stored / dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--rank-ratio", type=float, default=0.1)
    parser.add_argument("--value-bits", type=int, nargs="+", default=[16, 8, 4, 3])
    parser.add_argument("--lowrank-bits", type=int, nargs="+", default=[8])
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    provenance = Provenance.start()
    shapes = block_shapes(AutoConfig.from_pretrained(smollm2_path()))
    print(f"SmolLM2-135M block layers, kappa={args.rank_ratio}, group {args.group_size} columns (bits per weight)")
    columns = [(v, u) for v in args.value_bits for u in args.lowrank_bits]
    print("| rho | " + " | ".join(f"values {v} / U,V {u}" for v, u in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for rate in args.rates:
        cells = [bits_per_weight(shapes, rate, args.rank_ratio, v, u, args.group_size) for v, u in columns]
        print(f"| {rate} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    print(f"\n{provenance.line()}")


if __name__ == "__main__":
    main()
