"""Recovery fine-tuning demonstration: SmolLM2-135M at 50% kept parameters, before and after fine-tuning.

Stages (each stored as one JSON file under `--output`, written atomically, so a stopped run resumes):

1. `dense`: WikiText-2 `test` token perplexity of the dense model.
2. `oneshot`: one-shot OATS at `--rate` (κ = `--rank-ratio`, `svd="fast"`, C4 calibration); perplexity.
   The compressed checkpoint is kept under `--output/oneshot` for the next stage.
3. `recovery`: recovery fine-tuning of that checkpoint with `transformers.Trainer` on WikiText-2 `valid`
   (windows of `--train-seqlen` tokens): U and V train, S and its mask stay fixed; stopped after `--max-steps`
   optimizer steps or `--train-minutes`; perplexity; the recovered checkpoint is saved compactly.
4. `losparse` (with `--stages ... losparse`): LoSparse fine-tuning of the *dense* model on the same text and
   number of optimizer steps (no time cut: its schedule must run to the end), pruning S rows so the exported
   model keeps the same number of parameters (low-rank ratio `p = κ (1 - ρ)`; S is a full-size matrix, so its final
   remaining ratio is `(1 - κ)(1 - ρ)`); perplexity of the export.
5. `dense_ft` (with `--stages ... dense_ft`): a control, the dense model fine-tuned on the same text and steps
   (lr `--losparse-lr`), since part of any gain on WikiText-2 `test` is in-domain adaptation, not recovery.

Perplexity protocol: WikiText-2 raw test joined with "\\n\\n", first `--windows` non-overlapping windows of
`--eval-seqlen` tokens, exp(mean NLL) (`optimum_oats.evaluation.token_perplexity`).

    OMP_NUM_THREADS=1 OATS_DATA_DIR=../shared/data python benchmarks/recovery.py
    OMP_NUM_THREADS=1 OATS_DATA_DIR=../shared/data python benchmarks/recovery.py --stages losparse
    python benchmarks/recovery.py --quick          # minutes: a smoke run
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from toolkit.cells import read_cell, resume_cell
from toolkit.data import data_root
from toolkit.models import load_causal_lm, load_tokenizer
from toolkit.provenance import Provenance, utc_now
from toolkit.training import cpu_training_arguments
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_oats import OATSConfig, compress, compression_report
from optimum_oats.evaluation import token_perplexity, wikitext2_text
from optimum_oats.training.recovery import TimeBudgetCallback, mask_fingerprint, prepare_for_recovery, token_windows

STAGES = ("dense", "oneshot", "recovery", "losparse", "dense_ft")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["dense", "oneshot", "recovery"], choices=STAGES)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--train-minutes", type=float, default=18.0)
    parser.add_argument(
        "--no-balance", action="store_true", help="recovery without rebalancing U and V (shows why it is needed)"
    )
    parser.add_argument("--losparse-lr", type=float, default=1e-4)
    parser.add_argument(
        "--losparse-steps", type=int, default=None, help="LoSparse optimizer steps (default: the recovery run's)"
    )
    parser.add_argument("--output", default="bench_results/recovery")
    parser.add_argument("--quick", action="store_true", help="2 x 128 calibration, 2 x 256 evaluation, 4 steps")
    args = parser.parse_args()
    if args.quick:
        args.num_samples, args.seqlen, args.iterations = 2, 128, 4
        args.eval_seqlen, args.windows, args.train_seqlen, args.batch_size, args.max_steps = 256, 2, 64, 2, 4
        args.output += "-quick"
    return args


def stage(name: str, output: Path, fn) -> dict:
    """Run `fn()` once; later runs read the stored result."""

    def run() -> dict:
        print(f"== {name}", flush=True)
        result = fn()
        result["finished"] = utc_now()
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        return result

    return resume_cell(output / f"{name}.json", run)


def recovery_steps(args, output: Path) -> int:
    """The optimizer steps the recovery run actually made (it may stop on time), else `--max-steps`."""
    return (read_cell(output / "recovery.json") or {}).get("steps", args.max_steps)


def perplexity(model, tokenizer, text: str, args) -> float:
    start = time.monotonic()
    value = token_perplexity(model, tokenizer, text, seqlen=args.eval_seqlen, max_windows=args.windows)
    print(f"   perplexity {value:.3f} ({time.monotonic() - start:.0f} s)", flush=True)
    return value


def training_args(args, output: Path, lr: float, steps: int) -> TrainingArguments:
    return cpu_training_arguments(
        output,
        batch_size=args.batch_size,
        lr=lr,
        steps=steps,
        scheduler="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, steps // 20),
        seed=0,
    )


def losses(trainer: Trainer) -> list[dict]:
    return [{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]


def run_dense(args, tokenizer, test_text) -> dict:
    model = load_causal_lm(dtype=torch.float32)
    return {"perplexity": perplexity(model, tokenizer, test_text, args), "kept": 1.0}


def run_oneshot(args, tokenizer, test_text, output: Path) -> dict:
    model = load_causal_lm(dtype=torch.float32)
    config = OATSConfig(
        compression_rate=args.rate,
        rank_ratio=args.rank_ratio,
        num_iterations=args.iterations,
        svd="fast",
        dataset="c4",
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        seed=0,
    )
    start = time.monotonic()
    compress(model, config, tokenizer)
    seconds = time.monotonic() - start
    model.save_pretrained(output / "oneshot")
    report = compression_report(model)
    return {
        "perplexity": perplexity(model, tokenizer, test_text, args),
        "kept": report.kept_fraction,
        "mean_relative_error": report.mean_relative_error,
        "compress_seconds": round(seconds, 1),
    }


def run_recovery(args, tokenizer, test_text, valid_text, output: Path) -> dict:
    model = AutoModelForCausalLM.from_pretrained(output / "oneshot")
    masks = mask_fingerprint(model)
    trainable = prepare_for_recovery(model, balance=not args.no_balance)
    train = token_windows(tokenizer, valid_text, args.train_seqlen)
    trainer = Trainer(
        model=model,
        args=training_args(args, output / "recovery-run", args.lr, args.max_steps),
        train_dataset=train,
        callbacks=[TimeBudgetCallback(args.train_minutes * 60)],
    )
    start = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - start
    unchanged = all(torch.equal(m, masks[n]) for n, m in mask_fingerprint(model).items())
    model.save_pretrained(output / "recovered")
    return {
        "perplexity": perplexity(model, tokenizer, test_text, args),
        "kept": compression_report(model).kept_fraction,
        "trainable_parameters": trainable,
        "steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step * args.batch_size * args.train_seqlen,
        "train_windows_available": len(train),
        "train_seconds": round(seconds, 1),
        "lr": args.lr,
        "balanced_factors": not args.no_balance,
        "mask_unchanged": unchanged,
        "losses": losses(trainer),
    }


def run_dense_finetune(args, tokenizer, test_text, valid_text, output: Path) -> dict:
    """Control: the *dense* model fine-tuned on the same text and steps (lr `--losparse-lr`), to separate what
    recovery wins back from what any in-domain training on WikiText-2 gains."""
    model = load_causal_lm(dtype=torch.float32)
    steps = recovery_steps(args, output)
    train = token_windows(tokenizer, valid_text, args.train_seqlen)
    trainer = Trainer(
        model=model,
        args=training_args(args, output / "dense-ft-run", args.losparse_lr, steps),
        train_dataset=train,
    )
    start = time.monotonic()
    trainer.train()
    return {
        "perplexity": perplexity(model, tokenizer, test_text, args),
        "kept": 1.0,
        "steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step * args.batch_size * args.train_seqlen,
        "train_seconds": round(time.monotonic() - start, 1),
        "lr": args.losparse_lr,
        "losses": losses(trainer),
    }


def run_losparse(args, tokenizer, test_text, valid_text, output: Path) -> dict:
    from optimum_oats.training.losparse import LoSparseCallback, LoSparseConfig, apply_losparse, export_losparse

    model = load_causal_lm(dtype=torch.float32)
    kept = 1 - args.rate
    steps = args.losparse_steps
    if steps is None:  # default: as many optimizer steps as the recovery run actually made
        steps = recovery_steps(args, output)
    config = LoSparseConfig(
        low_rank_ratio=args.rank_ratio * kept,
        final_remaining_ratio=(1 - args.rank_ratio) * kept,
        initial_warmup_steps=max(1, steps // 10),
        final_warmup_steps=max(1, steps // 5),
        delta_t=max(1, steps // 30),
    )
    apply_losparse(model, config)
    train = token_windows(tokenizer, valid_text, args.train_seqlen)
    callback = LoSparseCallback(config)
    trainer = Trainer(
        model=model,
        args=training_args(args, output / "losparse-run", args.losparse_lr, steps),
        train_dataset=train,
        callbacks=[callback],
    )
    start = time.monotonic()
    trainer.train()
    seconds = time.monotonic() - start
    export_losparse(model)
    model.save_pretrained(output / "losparse")
    return {
        "perplexity": perplexity(model, tokenizer, test_text, args),
        "kept": compression_report(model).kept_fraction,
        "steps": trainer.state.global_step,
        "train_tokens": trainer.state.global_step * args.batch_size * args.train_seqlen,
        "train_seconds": round(seconds, 1),
        "lr": args.losparse_lr,
        "config": config.to_dict(),
        "losses": losses(trainer),
    }


def main() -> None:
    args = parse_args()
    provenance = Provenance.start()
    torch.manual_seed(0)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data_root(export=True)  # compress() calibrates on C4 from there
    tokenizer = load_tokenizer()
    test_text, valid_text = wikitext2_text(split="test"), wikitext2_text(split="valid")
    runs = {
        "dense": lambda: run_dense(args, tokenizer, test_text),
        "oneshot": lambda: run_oneshot(args, tokenizer, test_text, output),
        "recovery": lambda: run_recovery(args, tokenizer, test_text, valid_text, output),
        "losparse": lambda: run_losparse(args, tokenizer, test_text, valid_text, output),
        "dense_ft": lambda: run_dense_finetune(args, tokenizer, test_text, valid_text, output),
    }
    for name in args.stages:
        stage(name, output, runs[name])
    print(
        f"\nSmolLM2-135M-Instruct, rho={args.rate}, kappa={args.rank_ratio}; WikiText-2 test token perplexity, "
        f"first {args.windows} windows of {args.eval_seqlen}\n{provenance.line()}"
    )
    print("| model | kept | steps | train tokens | train s | perplexity |")
    print("|---|---|---|---|---|---|")
    for name in STAGES:
        r = read_cell(output / f"{name}.json")
        if r is not None:
            print(
                f"| {name} | {r['kept']:.3f} | {r.get('steps', '-')} | {r.get('train_tokens', '-')} | "
                f"{r.get('train_seconds', '-')} | {r['perplexity']:.2f} |"
            )


if __name__ == "__main__":
    main()
