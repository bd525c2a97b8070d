"""The zero-shot table both zero-shot scripts print: one row per task (its headline metric ± lm-eval's standard
error) and rows of means over chosen tasks, whose error is the root of the summed squared errors over their count
(tasks independent)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def headline(task_metrics: Mapping) -> tuple[str, float, float]:
    """The metric that enters `zero_shot_mean` (acc_norm where the task has it, else acc), its value and its standard
    error."""
    metric = "acc_norm" if "acc_norm" in task_metrics else "acc"
    return metric, task_metrics[metric], task_metrics.get(f"{metric}_stderr", math.nan)


def score_rows(
    results: Mapping[str, Mapping[str, Mapping]],
    tasks: Sequence[str],
    means: Mapping[str, Sequence[int]],
) -> tuple[list[str], dict[str, list[float]]]:
    """Markdown lines (header, one per task, one per entry of `means`: label -> indices into `tasks`; the first is
    bold) and each column's headline values in task order (shorter when a task is missing).

    Args:
        results: `{column: {task: lm-eval metrics with n_samples}}`.
    """
    names = list(results)
    lines = ["| task | metric | n | " + " | ".join(names) + " |", "|---|---|---:|" + "---:|" * len(names)]
    values: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, list[float]] = {name: [] for name in names}
    for task in tasks:
        cells, metric, n = [], "", ""
        for name in names:
            if task not in results[name]:
                cells.append("-")
                continue
            metric, value, stderr = headline(results[name][task])
            n = results[name][task].get("n_samples", "")
            values[name].append(value)
            errors[name].append(stderr)
            cells.append(f"{value:.3f} ± {stderr:.3f}")
        lines.append(f"| {task} | {metric} | {n} | " + " | ".join(cells) + " |")
    for position, (label, picked) in enumerate(means.items()):
        cells = []
        for name in names:
            if len(values[name]) < len(tasks):
                cells.append("-")
                continue
            mean = sum(values[name][i] for i in picked) / len(picked)
            error = math.sqrt(sum(errors[name][i] ** 2 for i in picked)) / len(picked)
            cells.append(f"**{mean:.4f}** ± {error:.4f}" if position == 0 else f"{mean:.4f} ± {error:.4f}")
        lines.append(f"| {label} | | | " + " | ".join(cells) + " |")
    return lines, values
