"""Zero-shot and WikiText evaluation of an in-memory model with lm-evaluation-harness, offline.

The task definitions live in `optimum_oats/lm_eval_tasks/` (see `lm_eval_tasks_dir()`): they carry lm-eval's own
task names and mirror the stock prompts and metrics, but read local files from a data folder given at run time
(`data_dir=` here, `OATS_DATA_DIR` or `--metadata data_dir=...` on the `lm_eval` command line).

Name collisions with the stock tasks: lm-eval 0.4.13's `TaskManager` indexes its own tasks first and then each
`include_path`, and a later definition of a name replaces the earlier one (logging "Task 'boolq' from ...
overrides existing task from ..."). Older lm-eval releases kept the *first* definition, so `evaluate_lm_eval`
does not rely on the order: it leaves the stock tasks out of the index when only offline tasks are requested, and
checks where every offline name resolves before running anything.

`lm_eval` is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.paths import resolve_data_dir
from .results import NON_METRICS
from .tasks_path import OFFLINE_TASKS, ZERO_SHOT_TASKS, lm_eval_tasks_dir

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# lm-eval's own warnings that describe how this module calls it, not anything the user did: an already-built model
# passed as `pretrained` (deliberate: it is the compressed model in memory) and the offline tasks' loader functions.
_LM_EVAL_NOISE = {
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized"),
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(prefix in message for prefix in self.prefixes)


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Drop `_LM_EVAL_NOISE` for the duration of one evaluation; every other lm-eval message still shows."""
    filters = [(logging.getLogger(name), _DropMessages(prefixes)) for name, prefixes in _LM_EVAL_NOISE.items()]
    for target, drop in filters:
        target.addFilter(drop)
    try:
        yield
    finally:
        for target, drop in filters:
            target.removeFilter(drop)


def _task_list(tasks: str | Sequence[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    return [part.strip() for name in names for part in name.split(",") if part.strip()]


def build_task_manager(
    data_dir: str | os.PathLike | None = None, include_defaults: bool = False, **metadata: Any
) -> TaskManager:
    """A lm-eval `TaskManager` that knows the offline tasks, with the data folder in their metadata.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            The data folder; defaults to `$OATS_DATA_DIR` (read when a task is loaded, if neither is set here).
        include_defaults (`bool`, defaults to `False`):
            Also index lm-eval's stock tasks (about 8 s), e.g. to run tasks that are not defined offline.
        **metadata:
            Extra metadata passed to every task.

    Returns:
        `lm_eval.tasks.TaskManager`
    """
    from lm_eval.tasks import TaskManager

    folder = resolve_data_dir(data_dir, required=False)
    if folder is not None:
        metadata["data_dir"] = str(folder)
    return TaskManager(include_path=lm_eval_tasks_dir(), include_defaults=include_defaults, metadata=metadata)


def _yaml_path(entry: Any) -> str | None:
    path = getattr(entry, "yaml_path", None)
    if path is None and isinstance(entry, dict):
        path = entry.get("yaml_path")
    return None if path is None else str(path)


def check_offline_resolution(task_manager: TaskManager, tasks: Sequence[str]) -> None:
    """Make sure every offline task name resolves to the YAML in `lm_eval_tasks_dir()`, not to the stock one.

    Args:
        task_manager (`lm_eval.tasks.TaskManager`): the task manager to check.
        tasks (`Sequence[str]`): requested task names; names that are not offline tasks are ignored.

    Raises:
        RuntimeError: an offline name is unknown or resolves elsewhere (would download from the Hub).
    """
    ours = Path(lm_eval_tasks_dir()).resolve()
    for name in tasks:
        if name not in OFFLINE_TASKS:
            continue
        path = _yaml_path(task_manager.task_index.get(name))
        if path is None or Path(path).resolve().parent != ours:
            raise RuntimeError(
                f"lm-eval resolves task {name!r} to {path!r}, not to the offline definition in {ours}. "
                "This lm-eval version does not let include_path override stock tasks; build the TaskManager "
                "with include_defaults=False."
            )


def summarize_results(results: dict[str, Any]) -> dict[str, Any]:
    """Flatten the output of `lm_eval.simple_evaluate` into `{task: {metric: value}}` plus `zero_shot_mean`.

    Metric keys lose lm-eval's filter suffix (`"acc,none"` becomes `"acc"`, `"acc_stderr,none"` becomes
    `"acc_stderr"`); standard errors that were not computed (`"N/A"`) are dropped, and `n_samples` records how many
    documents were scored.

    Args:
        results (`dict`): the dictionary returned by `lm_eval.simple_evaluate`.

    Returns:
        `dict`: one metrics dict per task, and `zero_shot_mean` (mean over the 8 zero-shot tasks of `acc_norm`
        where the task has it, else `acc`) when all 8 tasks are present.
    """
    summary: dict[str, Any] = {}
    n_samples = results.get("n-samples", {})
    for task, metrics in results["results"].items():
        flat: dict[str, float] = {}
        for key, value in metrics.items():
            if key in NON_METRICS or isinstance(value, (str, bool)) or value is None:
                continue
            metric, _, filter_name = key.partition(",")
            flat[metric if filter_name in ("", "none") else key] = float(value)
        if task in n_samples:
            flat["n_samples"] = int(n_samples[task].get("effective", n_samples[task].get("original", 0)))
        summary[task] = flat
    if all(task in summary for task in ZERO_SHOT_TASKS):
        scores = [summary[t]["acc_norm"] if "acc_norm" in summary[t] else summary[t]["acc"] for t in ZERO_SHOT_TASKS]
        summary["zero_shot_mean"] = sum(scores) / len(scores)
    return summary


def evaluate_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Sequence[str],
    data_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    num_fewshot: int = 0,
    max_length: int | None = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """Evaluate an in-memory model on lm-eval tasks, with the offline task definitions.

    Args:
        model (`PreTrainedModel`):
            A causal language model, already on its device (lm-eval runs it where it is).
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer.
        tasks (`str` or `Sequence[str]`):
            lm-eval task names, e.g. `ZERO_SHOT_TASKS` or `"wikitext,boolq"`. The offline ones are
            `wikitext, boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, piqa`; any other name
            is looked up among lm-eval's stock tasks (which usually need the Hub).
        data_dir (`str` or `os.PathLike`, *optional*):
            The data folder; defaults to `$OATS_DATA_DIR`.
        limit (`int` or `float`, *optional*):
            Score only the first `limit` documents of each task (or a fraction, if < 1). For tests only.
        batch_size (`int`, defaults to 1):
            lm-eval batch size.
        num_fewshot (`int`, defaults to 0):
            Number of in-context examples. Offline, they are drawn from the evaluation split itself (the scored
            document excluded), as lm-eval does when a task has no training split.
        max_length (`int`, *optional*):
            Context length lm-eval uses (rolling windows of `wikitext`); defaults to lm-eval's reading of the
            model config.
        **simple_evaluate_kwargs:
            Passed on to `lm_eval.simple_evaluate` (e.g. `bootstrap_iters`, `random_seed`).

    Returns:
        `dict`: `{task: {metric: value, ..., "n_samples": n}}` (see `summarize_results`), plus `zero_shot_mean` when
        all 8 zero-shot tasks were run.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = _task_list(tasks)
    if not names:
        raise ValueError("No task given")
    if any(name in OFFLINE_TASKS for name in names):
        data_dir = resolve_data_dir(data_dir)  # fail early, with a clear message, when there is no data folder
    task_manager = build_task_manager(data_dir, include_defaults=any(n not in OFFLINE_TASKS for n in names))
    check_offline_resolution(task_manager, names)

    simple_evaluate_kwargs.setdefault("log_samples", False)
    was_training = model.training
    model.eval()
    try:
        with _quiet_lm_eval():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                # 0 is every offline task's own default: passing it would only log "Overwriting default num_fewshot".
                num_fewshot=num_fewshot or None,
                limit=limit,
                task_manager=task_manager,
                **simple_evaluate_kwargs,
            )
    finally:
        model.train(was_training)
    if results is None:  # non-zero rank in a distributed run
        return {}
    summary = summarize_results(results)
    logger.info("lm-eval results: %s", summary)
    return summary
