"""Offline loaders for the lm-eval task definitions in this folder.

Each YAML here mirrors the stock lm-eval task of the same name (prompt, choices, target, metrics) but replaces
the Hugging Face Hub download with a `custom_dataset` function below that reads the local files described in
`shared/data/README.md`. The records are converted to the schema of the Hub dataset the stock task reads, so the
stock prompt templates apply unchanged.

The data folder is injected at run time, never hard-coded:

1. `data_dir` in the task metadata (`TaskManager(metadata={"data_dir": ...})`, or `--metadata data_dir=...` on
   the `lm_eval` command line), else
2. the `OATS_DATA_DIR` environment variable.

lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)`; the metadata also carries unrelated keys (the task
version, the model arguments), hence the `**kwargs` on every loader.

This module is loaded by lm-eval from its file path, so it only depends on the standard library, `datasets` and
`lm_eval` (not on `optimum_oats`), and the folder keeps working when copied elsewhere.
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import datasets

# The stock implementations, reused as-is so the metrics and text processing match lm-eval exactly.
from lm_eval.tasks.hellaswag.utils import preprocess as hellaswag_preprocess
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: F401

# The same variable as `optimum_oats.data.paths.DATA_DIR_ENV`, named again here because this folder must keep working
# when copied away from the package (see the module docstring).
DATA_DIR_ENV = "OATS_DATA_DIR"


def data_dir_from(data_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the data folder from the task metadata or `$OATS_DATA_DIR`.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            The folder passed through the task metadata.

    Returns:
        `Path`: the existing data folder.

    Raises:
        FileNotFoundError: no folder is configured, or it does not exist.
    """
    source = "task metadata `data_dir`"
    if not data_dir:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        source = f"${DATA_DIR_ENV}"
    if not data_dir:
        raise FileNotFoundError(
            "The optimum_oats offline lm-eval tasks read local files and need their folder: set the "
            f"{DATA_DIR_ENV} environment variable (or pass `--metadata data_dir=/path/to/data` to lm_eval, "
            "`data_dir=` to optimum_oats.evaluation.evaluate_lm_eval)."
        )
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Evaluation data folder {str(path)!r} (from {source}) does not exist.")
    return path


def _file(data_dir: str | os.PathLike | None, relative: str) -> Path:
    path = data_dir_from(data_dir) / relative
    if not path.is_file():
        raise FileNotFoundError(f"Missing evaluation file {str(path)!r}; check {DATA_DIR_ENV} / data_dir.")
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _dataset(**splits: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


# ----------------------------------------------------------------------------------------------- wikitext


def wikitext_pages(path: str | os.PathLike) -> list[str]:
    """Split a raw WikiText file into articles, as `EleutherAI/wikitext_document_level` does.

    A new page starts at every level-1 heading (` = Title = `); the page keeps the file's lines joined by `"\\n"`.

    Args:
        path (`str` or `os.PathLike`): a `wiki.*.raw` file.

    Returns:
        `list[str]`: the pages, in file order.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    pages, current = [], []
    for line in lines:
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


def load_wikitext(data_dir: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """WikiText-2 raw, document level (`page` column), validation and test splits."""
    return _dataset(
        validation=[{"page": p} for p in wikitext_pages(_file(data_dir, "wikitext2/wiki.valid.raw"))],
        test=[{"page": p} for p in wikitext_pages(_file(data_dir, "wikitext2/wiki.test.raw"))],
    )


# ----------------------------------------------------------------------------------------------- SuperGLUE / GLUE


def load_boolq(data_dir: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """BoolQ validation in the `aps/super_glue` schema (`label`: 0 = False, 1 = True)."""
    rows = []
    for doc in _read_jsonl(_file(data_dir, "boolq/val.jsonl")):
        label = doc["label"]
        label = label if isinstance(label, bool) else str(label).strip().lower() == "true"
        rows.append({"question": doc["question"], "passage": doc["passage"], "idx": doc["idx"], "label": int(label)})
    return _dataset(validation=rows)


_RTE_LABELS = {"entailment": 0, "not_entailment": 1}


def load_rte(data_dir: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """RTE validation in the `nyu-mll/glue` schema (`sentence1`, `sentence2`, `label`: 0 = entailment)."""
    rows = [
        {
            "sentence1": doc["premise"],
            "sentence2": doc["hypothesis"],
            "label": doc["label"] if isinstance(doc["label"], int) else _RTE_LABELS[doc["label"]],
            "idx": doc["idx"],
        }
        for doc in _read_jsonl(_file(data_dir, "rte/val.jsonl"))
    ]
    return _dataset(validation=rows)


# ----------------------------------------------------------------------------------------------- HellaSwag

_LAST_FRAGMENT = re.compile(r"^(?P<head>.*[.!?]\s+|[^:]*:\s+)(?P<tail>[a-z][^.!?]*)$")


def _recapitalise(query: str) -> str:
    """Re-capitalise the final context fragment (HellaSwag's `ctx_b`) as lm-eval does with `ctx_b.capitalize()`.

    The local file only holds `activity_label: ctx_a ctx_b` joined, so `ctx_b` is taken to be the text after the
    last sentence end when it starts in lower case, which is how the ActivityNet items are split.
    """
    match = _LAST_FRAGMENT.match(query)
    if match is None:
        return query
    return match.group("head") + match.group("tail").capitalize()


def load_hellaswag(data_dir: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """HellaSwag validation in the `Rowan/hellaswag` schema (as far as the local text file allows).

    The file holds 6 lines per item: `activity_label: ctx`, the gold index, then the 4 endings.
    """
    with bz2.open(_file(data_dir, "hellaswag/hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"HellaSwag file has {len(lines)} lines, not a multiple of 6")
    rows = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2 : i + 6]
        activity_label, _, ctx = head.partition(": ")
        rows.append({"ind": i // 6, "activity_label": activity_label, "ctx": ctx, "endings": endings, "label": label})
    return _dataset(validation=rows)


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's HellaSwag `process_docs`, on the joined context of the local file."""

    def _process_doc(doc: dict[str, Any]) -> dict[str, Any]:
        return {
            "query": hellaswag_preprocess(_recapitalise(doc["activity_label"] + ": " + doc["ctx"])),
            "choices": [hellaswag_preprocess(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_process_doc)


# ----------------------------------------------------------------------------------------------- WinoGrande


def load_winogrande(data_dir: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """WinoGrande (xl) validation, already split at the blank: `context_options`, `continuation`, `gold`."""
    rows = [
        {"context_options": doc["context_options"], "continuation": doc["continuation"], "gold": int(doc["gold"])}
        for doc in _read_jsonl(_file(data_dir, "winogrande/winogrande_dev_llmfoundry.jsonl"))
    ]
    return _dataset(validation=rows)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """Index of the correct context (lm-eval's winogrande scores the shared continuation after each context)."""
    return doc["gold"]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """The sentence after the blank (lm-eval: `sentence[idx + 1:].strip()`)."""
    return doc["continuation"].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank with each option filled in (lm-eval: `sentence[:idx] + option`)."""
    return list(doc["context_options"])


# ----------------------------------------------------------------------------------------------- ARC


def _load_arc(data_dir: str | None, name: str) -> datasets.DatasetDict:
    rows = []
    for doc in _read_jsonl(_file(data_dir, f"arc/{name}-Test.jsonl")):
        choices = doc["question"]["choices"]
        rows.append(
            {
                "id": doc["id"],
                "question": doc["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": doc["answerKey"],
            }
        )
    return _dataset(test=rows)


def load_arc_easy(data_dir: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """ARC-Easy test in the `allenai/ai2_arc` schema."""
    return _load_arc(data_dir, "ARC-Easy")


def load_arc_challenge(data_dir: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """ARC-Challenge test in the `allenai/ai2_arc` schema."""
    return _load_arc(data_dir, "ARC-Challenge")


# ----------------------------------------------------------------------------------------------- OpenBookQA

_OBQA_CHOICE = re.compile(r"\(([A-Z])\) ")


def load_openbookqa(data_dir: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """OpenBookQA main test in the `allenai/openbookqa` schema, parsed from the original TSV."""
    rows = []
    with open(_file(data_dir, "openbookqa/test.tsv"), encoding="utf-8", newline="") as f:
        for record in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            parts = _OBQA_CHOICE.split(record["Choices"])
            if parts[0].strip() or len(parts) < 5:
                raise ValueError(f"Cannot parse OpenBookQA choices {record['Choices']!r}")
            rows.append(
                {
                    "id": record["ID"],
                    "question_stem": record["Question Stem"],
                    "choices": {"text": [t.strip() for t in parts[2::2]], "label": parts[1::2]},
                    "answerKey": record["Answer Key"].strip(),
                }
            )
    return _dataset(test=rows)


# ----------------------------------------------------------------------------------------------- PIQA


def load_piqa(data_dir: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """PIQA validation in the `baber/piqa` schema (`goal`, `sol1`, `sol2`, `label`)."""
    docs = _read_jsonl(_file(data_dir, "piqa/valid.jsonl"))
    labels = _read_lines(_file(data_dir, "piqa/valid-labels.lst"))
    if len(docs) != len(labels):
        raise ValueError(f"PIQA has {len(docs)} questions but {len(labels)} labels")
    rows = [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)}
        for d, y in zip(docs, labels, strict=True)
    ]
    return _dataset(validation=rows)
