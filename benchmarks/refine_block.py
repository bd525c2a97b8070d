"""Block refinement's learning rate, one block at a time: calibration and held-out block loss per method (issue 17).

For each selected decoder block of SmolLM2-135M, the block's inputs come from the *dense* model on C4 windows; the
block is compressed by each method at the same rate (the library's `compress_block`, as the block loop does), then
refined (`refine_block`, 64 Adam steps by default) at each learning rate from the same start. The loss is the block
output's mean squared error against the dense block: on the calibration windows it was refined on, and on held-out
windows that it never saw (what the model's perplexity feels). A setting `LR:LOWRANK_LR` gives U and V their own
rate. It is the cheap (minutes per block) way to choose the refinement's settings before a perplexity run of
`benchmarks/quality.py` (half an hour per model on one core).

    OMP_NUM_THREADS=1 OATS_DATA_DIR=../shared/data python benchmarks/refine_block.py
    OMP_NUM_THREADS=1 python benchmarks/refine_block.py --methods hassle --blocks 15 --settings 1e-3 1e-3:3e-4
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from toolkit.data import data_root
from toolkit.models import load_causal_lm, load_tokenizer
from toolkit.provenance import Provenance

from optimum_oats import OATSConfig
from optimum_oats.algorithms import ALGORITHMS
from optimum_oats.data.inputs import CalibrationData, calibration_inputs
from optimum_oats.engine.blocks import find_linear_layers, find_main_block_stack, set_module
from optimum_oats.engine.capture import block_forward, capture_block_inputs, sample_calls
from optimum_oats.engine.layers import compress_block, statistics_needed
from optimum_oats.engine.refine import block_loss, refine_block
from optimum_oats.engine.statistics import collect_statistics


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["sparsegpt", "hassle"], choices=sorted(ALGORITHMS))
    parser.add_argument("--rate", type=float, default=0.6)
    parser.add_argument("--blocks", type=int, nargs="+", default=[3, 15, 27])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["1e-4", "3e-4", "1e-3", "3e-3", "1e-3:3e-4", "3e-3:3e-4"],
        help="refinement learning rates, each LR or LR:LOWRANK_LR (U and V's own rate)",
    )
    parser.add_argument("--steps", type=int, default=64, help="Adam steps (OATSConfig.refine_steps)")
    parser.add_argument("--num-samples", type=int, default=16, help="calibration windows (refined on)")
    parser.add_argument("--held-out", type=int, default=8, help="further windows, never refined on")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank-ratio", type=float, default=0.1, help="κ of the low-rank methods")
    args = parser.parse_args()
    args.settings = [parse_setting(s, parser) for s in args.settings]
    return args


def parse_setting(text: str, parser: argparse.ArgumentParser) -> tuple[float, float | None]:
    lr, _, lowrank = text.partition(":")
    try:
        return float(lr), float(lowrank) if lowrank else None
    except ValueError:
        parser.error(f"--settings {text!r}: expected LR or LR:LOWRANK_LR, e.g. 1e-3 or 1e-3:3e-4")


def compressed_copy(block, prefix: str, method: str, hidden, kwargs, args) -> tuple[torch.nn.Module, dict]:
    """A copy of the dense `block` compressed by `method` from its calibration inputs; `(block, compact layers)`."""
    block = copy.deepcopy(block)
    config = OATSConfig(compression_rate=args.rate, method=method, rank_ratio=args.rank_ratio, svd="fast")
    local = {n[len(prefix) + 1 :]: m for n, m in find_linear_layers(block, prefix, config.is_skipped).items()}
    with torch.no_grad(), collect_statistics(local, statistics_needed(method)) as accumulators:
        block_forward(block, hidden, kwargs)
    layers = {}
    for name, (layer, _) in compress_block(prefix, local, accumulators, config).items():
        set_module(block, name, layer)
        layers[name] = layer
    return block, layers


def main() -> None:
    args = parse_args()
    provenance = Provenance.start()
    torch.manual_seed(0)
    data_root(export=True)  # the calibration windows come from C4 there
    model = load_causal_lm(dtype=torch.float32).eval()
    tokenizer = load_tokenizer()
    total = args.num_samples + args.held_out
    windows = OATSConfig(dataset="c4", num_samples=total, seqlen=args.seqlen, seed=args.seed)
    ids = calibration_inputs(model, windows, CalibrationData.from_config(windows, tokenizer=tokenizer))
    stack, blocks = find_main_block_stack(model)
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks, ids, progress=False)
    print(
        f"# SmolLM2-135M-Instruct, rate {args.rate}, κ {args.rank_ratio}, {args.steps} Adam steps, "
        f"{args.num_samples} calibration + {args.held_out} held-out C4 windows of {args.seqlen} (seed {args.seed})\n"
        f"{provenance.line()}"
    )
    print("| block | method | lr | U, V lr | calibration loss | held-out loss | held-out / start | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    hidden = inputs.hidden_states
    held: dict[tuple[int, str, tuple], float] = {}
    for index, block in enumerate(blocks):
        kwargs = inputs.block_kwargs[index]
        if index in args.blocks:
            calls = sample_calls(kwargs, total)
            fit, check = hidden[: args.num_samples], hidden[args.num_samples :]
            with torch.no_grad():
                targets = block_forward(block, hidden, kwargs)
            fit_targets, check_targets = targets[: args.num_samples], targets[args.num_samples :]
            for method in args.methods:
                compressed, layers = compressed_copy(block, f"{stack}.{index}", method, fit, kwargs, args)
                start = copy.deepcopy(compressed.state_dict())
                start_held = block_loss(compressed, check, calls[args.num_samples :], check_targets)
                start_fit = block_loss(compressed, fit, calls[: args.num_samples], fit_targets)
                print(f"| {index} | {method} | start | | {start_fit:.4g} | {start_held:.4g} | 1 | |", flush=True)
                for lr, lowrank_lr in args.settings:
                    compressed.load_state_dict(start)
                    for layer in layers.values():  # a dense cache built from other values must not be used
                        layer.release_caches()
                    began = time.perf_counter()
                    _, after = refine_block(
                        compressed, layers, fit, kwargs, fit_targets, steps=args.steps, lr=lr, lowrank_lr=lowrank_lr
                    )
                    seconds = time.perf_counter() - began
                    loss = block_loss(compressed, check, calls[args.num_samples :], check_targets)
                    held[index, method, (lr, lowrank_lr)] = loss
                    shown = "" if lowrank_lr is None else f"{lowrank_lr:g}"
                    print(
                        f"| {index} | {method} | {lr:g} | {shown} | {after:.4g} | {loss:.4g} | "
                        f"{loss / start_held:.3f} | {seconds:.0f} |",
                        flush=True,
                    )
        if index == max(args.blocks):
            break
        with torch.no_grad():
            hidden = block_forward(block, hidden, kwargs)
    if len(args.methods) == 2:
        first, second = args.methods
        print(f"\n### Held-out loss, {second} / {first}, same block and learning rate")
        labels = [f"{lr:g}" + ("" if u is None else f":{u:g}") for lr, u in args.settings]
        print("| block | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(args.settings))
        for index in args.blocks:
            ratios = [held[index, second, s] / held[index, first, s] for s in args.settings]
            print(f"| {index} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
