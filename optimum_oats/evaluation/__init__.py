"""Evaluation: paper-style WikiText-2 token perplexity and offline lm-evaluation-harness tasks.

Data is read from a folder given as `data_dir=` or through the `OATS_DATA_DIR` environment variable (layout:
`shared/data/README.md`). The names below are imported lazily, so importing this package (or running
`python -m optimum_oats.evaluation.tasks_path`) loads neither `lm_eval` nor `torch`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DATA_DIR_ENV": "..data.paths",
    "resolve_data_dir": "..data.paths",
    "ZERO_SHOT_TASKS": "harness",
    "build_task_manager": "harness",
    "check_offline_resolution": "harness",
    "evaluate_lm_eval": "harness",
    "summarize_results": "harness",
    "token_perplexity": "perplexity",
    "wikitext2_rows": "perplexity",
    "wikitext2_text": "perplexity",
    "OFFLINE_TASKS": "tasks_path",
    "lm_eval_tasks_dir": "tasks_path",
}

__all__ = [
    "DATA_DIR_ENV",
    "OFFLINE_TASKS",
    "ZERO_SHOT_TASKS",
    "build_task_manager",
    "check_offline_resolution",
    "evaluate_lm_eval",
    "lm_eval_tasks_dir",
    "resolve_data_dir",
    "summarize_results",
    "token_perplexity",
    "wikitext2_rows",
    "wikitext2_text",
]

if TYPE_CHECKING:
    from ..data.paths import DATA_DIR_ENV, resolve_data_dir
    from .harness import (
        ZERO_SHOT_TASKS,
        build_task_manager,
        check_offline_resolution,
        evaluate_lm_eval,
        summarize_results,
    )
    from .perplexity import token_perplexity, wikitext2_rows, wikitext2_text
    from .tasks_path import OFFLINE_TASKS, lm_eval_tasks_dir


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module if module.startswith(".") else f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
