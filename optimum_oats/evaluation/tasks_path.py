"""Location of the offline lm-eval task definitions shipped with the package.

`python -m optimum_oats.evaluation.tasks_path` prints the folder, for the stock `lm_eval` command line::

    OATS_DATA_DIR=/path/to/data lm_eval --model hf --model_args pretrained=MODEL_DIR,dtype=float32 \\
        --tasks boolq,arc_easy --device cpu --include_path "$(python -m optimum_oats.evaluation.tasks_path)"
"""

from __future__ import annotations

import sys
from pathlib import Path

ZERO_SHOT_TASKS: tuple[str, ...] = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
    "piqa",
)
"""The 8 zero-shot tasks of the pruning papers (Wanda, OWL, OATS), averaged into `zero_shot_mean`."""

OFFLINE_TASKS: tuple[str, ...] = ("wikitext", *ZERO_SHOT_TASKS)
"""The lm-eval task names defined offline in `optimum_oats/evaluation/lm_eval_tasks/`."""


def lm_eval_tasks_dir() -> str:
    """Folder holding the offline lm-eval task YAMLs (pass it as lm-eval's `include_path`).

    Returns:
        `str`: absolute path of `optimum_oats/evaluation/lm_eval_tasks`.
    """
    return str(Path(__file__).resolve().parent / "lm_eval_tasks")


def main() -> None:
    """Print the task folder on stdout."""
    sys.stdout.write(lm_eval_tasks_dir() + "\n")


if __name__ == "__main__":
    main()
