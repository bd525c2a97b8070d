"""`oats evaluate MODEL [--dense BASE]`: WikiText-2 token perplexity and zero-shot accuracy, side by side."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any


def task_list(tasks: list[str] | None) -> list[str]:
    """`--tasks` as given (space- or comma-separated); default the 8 zero-shot tasks; `none` means no task."""
    from optimum_oats.evaluation import ZERO_SHOT_TASKS

    if tasks is None:
        return list(ZERO_SHOT_TASKS)
    names = [part.strip() for item in tasks for part in item.split(",") if part.strip()]
    return [] if [n.lower() for n in names] == ["none"] else names


def _limit(limit: float | None) -> int | float | None:
    return int(limit) if limit is not None and limit >= 1 and float(limit).is_integer() else limit


def evaluate_one(name: str, args: argparse.Namespace, tasks: list[str]) -> dict[str, Any]:
    """All requested numbers for one model; the model is freed before returning."""
    from optimum_oats.evaluation import evaluate_lm_eval, token_perplexity, wikitext2_text

    from .runner import load_model

    model, tokenizer = load_model(name, args.dtype, args.device)
    results: dict[str, Any] = {}
    try:
        if not args.no_perplexity:
            text = wikitext2_text(args.data_dir)
            ppl = token_perplexity(model, tokenizer, text, seqlen=args.seqlen, max_windows=args.max_windows)
            results["wikitext2"] = {"token_perplexity": ppl, "seqlen": args.seqlen}
            if args.max_windows is not None:
                results["wikitext2"]["max_windows"] = args.max_windows
        if tasks:
            results.update(
                evaluate_lm_eval(
                    model,
                    tokenizer,
                    tasks,
                    data_dir=args.data_dir,
                    limit=_limit(args.limit),
                    batch_size=args.batch_size,
                )
            )
    finally:
        del model
        gc.collect()
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    from optimum_oats.engine.report import REPORT_FILE
    from optimum_oats.hub.card import EVAL_FILE, comparison_table
    from optimum_oats.utils.files import atomic_write_json

    tasks = task_list(args.tasks)
    if args.no_perplexity and not tasks:
        raise ValueError("Nothing to evaluate: --no-perplexity and --tasks none.")
    compressed = evaluate_one(args.model, args, tasks)
    dense = evaluate_one(args.dense, args, tasks) if args.dense else None
    sys.stdout.write(comparison_table(compressed, dense) + "\n")
    summary = {"model": args.model, "dense_model": args.dense, "compressed": compressed, "dense": dense}
    beside = Path(args.model)
    if (beside / REPORT_FILE).is_file():  # a local compressed checkpoint: its card (save/push) will show these
        atomic_write_json(beside / EVAL_FILE, {"base_model": args.dense, "compressed": compressed, "dense": dense})
        summary["eval_results"] = str((beside / EVAL_FILE).resolve())
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        summary["output"] = str(path.resolve())
    return summary
