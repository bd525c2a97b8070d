"""Labelled text-classification rows for the fine-tuning benchmarks: read, tokenize, train, score.

Shared by `losparse_glue.py` (SST-2) and `losparse_boolq.py` (BoolQ). A row is a dict with the task's text
fields and an integer `label`; `fields` names the one (single sentence) or two (pair) text fields to read.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch
from datasets import Dataset

from optimum_oats.training.losparse import losparse_layers

from .training import cpu_training_arguments

SST2_FIELDS = ("sentence",)
BOOLQ_FIELDS = ("question", "passage")


def read_sst2(root: Path, split: str) -> list[dict]:
    """GLUE SST-2 `train` or `dev` (`$OATS_DATA_DIR/sst2/<split>.tsv`, header `sentence\\tlabel`)."""
    file = root / "sst2" / f"{split}.tsv"
    if not file.is_file():
        raise SystemExit(f"{file} is missing: set OATS_DATA_DIR to the shared data folder (it holds sst2/).")
    with file.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [{"sentence": row["sentence"], "label": int(row["label"])} for row in reader]


def read_boolq(root: Path) -> list[dict]:
    """BoolQ validation (`$OATS_DATA_DIR/boolq/val.jsonl`), labels as 0 (no) / 1 (yes)."""
    rows = [json.loads(line) for line in (root / "boolq" / "val.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        row["label"] = int(row["label"] in (True, "true", "True"))
    return rows


def seeded_subset(rows: list[dict], size: int | None, seed: int) -> list[dict]:
    """The first `size` rows of a seeded permutation (all rows, permuted, when `size` is None)."""
    if size is not None and not 0 < size <= len(rows):
        raise SystemExit(f"A subset of {size} rows was asked for; the split has {len(rows)}.")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order[:size]]


def _texts(rows: list[dict], fields: tuple[str, ...]) -> list[list[str]]:
    return [[r[name] for r in rows] for name in fields]


def encode(tokenizer, rows: list[dict], fields: tuple[str, ...], max_length: int) -> Dataset:
    """Unpadded token ids + labels; `DataCollatorWithPadding` pads each batch to its own longest row."""
    batch = tokenizer(*_texts(rows, fields), truncation=True, max_length=max_length)
    return Dataset.from_dict({**batch, "labels": [r["label"] for r in rows]})


@torch.no_grad()
def predictions(model, tokenizer, rows: list[dict], fields: tuple[str, ...], max_length: int, batch_size: int = 64):
    """Predicted labels, in batches padded to their own longest row."""
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        batch = tokenizer(
            *_texts(rows[start : start + batch_size], fields),
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        out += model(**batch).logits.argmax(-1).tolist()
    return out


def accuracy(model, tokenizer, rows: list[dict], fields: tuple[str, ...], max_length: int) -> float:
    predicted = predictions(model, tokenizer, rows, fields, max_length)
    return sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)


def binomial_se(accuracy_value: float, n: int) -> float:
    """Standard error of an accuracy measured on `n` independent examples."""
    return math.sqrt(accuracy_value * (1 - accuracy_value) / n)


def summarize(records: list[dict], n: int) -> tuple[float, float]:
    """Mean accuracy over seeds and its standard error: the test-set binomial term plus the seed spread."""
    accs = [r["test_accuracy"] for r in records]
    mean = sum(accs) / len(accs)
    spread = sum((a - mean) ** 2 for a in accs) / (len(accs) - 1) if len(accs) > 1 else 0.0
    return mean, math.sqrt(binomial_se(mean, n) ** 2 / len(accs) + spread / len(accs))


def lowrank_share(model) -> float:
    """The fraction of the LoSparse layers' dense parameters held by U V."""
    layers = losparse_layers(model).values()
    dense = sum(m.in_features * m.out_features for m in layers)
    return sum(m.rank * (m.in_features + m.out_features) for m in layers) / dense


def finetune_arguments(output_dir: Path, args, steps: int, seed: int, logs: int, **extra):
    """Every cell's `Trainer` settings: AdamW at `args.lr`, linear decay after a 10% warm-up, batch `args.batch_size`,
    about `logs` loss records, `seed` for the head, dropout and data order."""
    return cpu_training_arguments(
        output_dir,
        batch_size=args.batch_size,
        lr=args.lr,
        steps=steps,
        scheduler="linear",
        warmup_steps=max(1, steps // 10),
        weight_decay=0.01,
        logging_steps=max(1, steps // logs),
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
        **extra,
    )
