"""Model cards of compressed checkpoints: rendering is pure (report + numbers in, `ModelCard` out), so a card can
be reviewed or tested without a model or a network. Publishing is `publish.py`'s job.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from ..algorithms import method_info, method_names
from ..engine.report import CompressionReport
from ..evaluation.results import NON_METRICS
from ..integrations.auto_classes import CAUSAL_LM, ModelTask
from ..integrations.default_model import DEFAULT_MODEL_NAME
from .plots import as_report

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "oats_model_card.md"
PLOT_FILE = "oats_layers.png"
EVAL_FILE = "eval_results.json"
CARD_FILE = "README.md"
TAGS = ("oats", "sparse", "low-rank", "pruning", "optimum-oats")
# The Hub's model tree knows four relations: adapter, merge, quantized, finetune. A compressed copy of the
# base weights is closest to "quantized" (listed under the base model's "Quantizations").
BASE_MODEL_RELATION = "quantized"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
KNOWN_LICENSES = {DEFAULT_MODEL_HUB_ID: "apache-2.0"}
# lm-eval task or evaluation name -> (Hub dataset, config, split) for the model-index.
_DATASETS: dict[str, tuple[str, str | None, str]] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test"),
    "wikitext": ("wikitext", "wikitext-2-raw-v1", "test"),
    "boolq": ("super_glue", "boolq", "validation"),
    "rte": ("super_glue", "rte", "validation"),
    "hellaswag": ("hellaswag", None, "validation"),
    "winogrande": ("winogrande", "winogrande_xl", "validation"),
    "arc_easy": ("ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("ai2_arc", "ARC-Challenge", "test"),
    "openbookqa": ("openbookqa", "main", "test"),
    "piqa": ("piqa", None, "validation"),
}


# ----------------------------------------------------------------------------------------------- card rendering
def model_card_template() -> str:
    """The Jinja template shipped in `optimum_oats/hub/templates/` (`model_cards/` at the repo root links to it)."""
    return resources.files(__package__).joinpath("templates", TEMPLATE_FILE).read_text(encoding="utf-8")


@dataclass
class CardDetails:
    """What a card says beyond the compression report.

    Args:
        base_model: Hub id of the dense model that was compressed.
        eval_results / dense_results: `{task: {metric: value, "n_samples": n}, "zero_shot_mean": x}` of the
            compressed / dense model (the output of `evaluate_lm_eval`, plus `{"wikitext2": {"token_perplexity": p}}`).
            The compressed numbers go to the `model-index` metadata, both into a side-by-side table.
        license: the license; defaults to the base model's when known, else `"other"`.
        repo_id: used in the loading snippet.
        model_name: name in the `model-index`; defaults to the repo name, else `<base>-oats`.
        task: how the checkpoint loads (Auto class, pipeline tag, tokenizer or image processor), from
            `integrations.auto_classes.model_task`; defaults to a causal LM.
        plot_path: path of the per-layer PNG inside the repo, embedded as an image.
    """

    base_model: str | None = None
    eval_results: dict[str, Any] | None = None
    dense_results: dict[str, Any] | None = None
    license: str | None = None  # noqa: A003 - the Hub's metadata field name
    repo_id: str | None = None
    model_name: str | None = None
    task: ModelTask | None = None
    plot_path: str | None = None


def render_model_card(
    report: CompressionReport | dict[str, Any], details: CardDetails | None = None, **fields: Any
) -> ModelCard:
    """Render the model card of a compressed checkpoint. Pure: reads only the packaged template, no network.

    Args:
        report: the `CompressionReport`, or the dict of an `oats_report.json`.
        details: [`CardDetails`]; its fields may also be given as keywords (`base_model=...`).
    """
    details = replace(details or CardDetails(), **fields)
    base_model, eval_results, dense_results = details.base_model, details.eval_results, details.dense_results
    license, repo_id, model_name, plot_path = details.license, details.repo_id, details.model_name, details.plot_path
    task = details.task or CAUSAL_LM
    report = as_report(report)
    config = report.config
    name = model_name or (repo_id.split("/")[-1] if repo_id else f"{(base_model or 'model').split('/')[-1]}-oats")
    method = config.get("method", "oats")
    tags = [*TAGS, *([method] if method not in TAGS else [])]
    results = _eval_results(eval_results or {})
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation=BASE_MODEL_RELATION if base_model else None,
        library_name="transformers",
        pipeline_tag=task.pipeline_tag,
        license=license or KNOWN_LICENSES.get(base_model, "other"),
        tags=tags,
        model_name=name if results else None,
        eval_results=results or None,
    )
    rows, zero_shot = comparison_rows(eval_results or {}, dense_results or {})
    return ModelCard.from_template(
        card_data,
        template_str=model_card_template(),
        model_name=name,
        base_model=base_model,
        repo_id=repo_id or "path/to/this/checkpoint",
        method_label=method_info(method).label if method in method_names() else method,
        auto_class=task.auto_class,
        processor_class=task.processor_class,
        processor_name="image_processor" if task.is_vision else "tokenizer",
        dense_parts="`lm_head`" if task == CAUSAL_LM else "poolers and task heads",
        config=config,
        config_json=json.dumps(config, indent=2, sort_keys=True),
        summary=_summary(report),
        layers=[_layer_row(layer) for layer in report.layers],
        plot_path=Path(plot_path).as_posix() if plot_path else None,
        eval_rows=rows,
        zero_shot=zero_shot,
    )


def _summary(report: CompressionReport) -> dict[str, str]:
    error = report.mean_relative_error
    return {
        "compressed_layers": str(len(report.layers)),
        "dense_parameters": f"{report.dense_parameters:,}",
        "kept_parameters": f"{report.kept_parameters:,}",
        "kept_fraction": f"{report.kept_fraction:.1%}",
        "mean_relative_error": "n/a" if error is None else f"{error:.4f}",
        "bits_per_weight": "n/a" if report.bits_per_weight is None else f"{report.bits_per_weight:.3f}",
        "storage": _storage(report.config),
    }


def _storage(config: dict[str, Any]) -> str:
    """How values and factors are stored, in words (the bits `layer_map` records per layer)."""
    values, factors = config.get("value_bits", 16), config.get("lowrank_bits", 16)
    embedding = "; token embedding and tied LM head as int8 rows" if config.get("embedding_bits") == 8 else ""
    if values >= 16 and factors >= 16:
        return "values and factors in the checkpoint's float dtype; 1-bit mask" + embedding
    group = config.get("group_size")
    parts = [f"{values}-bit values" if values < 16 else "float values", "1-bit mask"]
    parts.append(f"{factors}-bit U, V" if factors < 16 else "float U, V")
    return ", ".join(parts) + f"; one fp16 scale per {group} input columns of each row" + embedding


def _layer_row(layer) -> dict[str, str]:
    return {
        "name": layer.name,
        "shape": f"{layer.out_features} × {layer.in_features}",
        "rank": str(layer.rank),
        "nnz": f"{layer.nnz:,}",
        "kept_fraction": f"{layer.kept_fraction:.1%}",
        "relative_error": "n/a" if layer.relative_error is None else f"{layer.relative_error:.4f}",
    }


def _metrics(task_results: Any) -> Iterable[tuple[str, float]]:
    if not isinstance(task_results, dict):
        return []
    return [
        (metric, float(value))
        for metric, value in task_results.items()
        if metric not in NON_METRICS
        and not metric.endswith("_stderr")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    ]


def _eval_results(results: dict[str, Any]) -> list[EvalResult]:
    out = []
    for task, task_results in results.items():
        dataset, config, split = _DATASETS.get(task, (task, None, "test"))
        for metric, value in _metrics(task_results):
            out.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=task,
                    dataset_type=dataset,
                    dataset_name=task,
                    dataset_config=config,
                    dataset_split=split,
                    metric_type=metric,
                    metric_name=metric,
                    metric_value=value,
                )
            )
    return out


def _fmt(value: float | None, sign: str = "") -> str:
    """4 significant digits; large numbers (perplexities of bad models) in full rather than as 5.149e+04."""
    if value is None:
        return "–"
    return f"{value:{sign},.0f}" if abs(value) >= 1e4 else f"{value:{sign}.4g}"


def _row(task: str, metric: str, compressed: float | None, dense: float | None) -> dict[str, str]:
    # Rounded so that equal scores show +0, not float residue such as -5.551e-17.
    delta = None if compressed is None or dense is None else round(compressed - dense, 10)
    return {
        "task": task,
        "metric": metric,
        "compressed": _fmt(compressed),
        "dense": _fmt(dense),
        "delta": _fmt(delta, "+"),
    }


def comparison_rows(compressed: dict[str, Any], dense: dict[str, Any]) -> tuple[list[dict[str, str]], dict | None]:
    """Table rows for every (task, metric) of either model, compressed-model order first."""
    rows = []
    for task in dict.fromkeys([*compressed, *dense]):
        if task == "zero_shot_mean":
            continue
        ours, theirs = dict(_metrics(compressed.get(task))), dict(_metrics(dense.get(task)))
        samples = (compressed.get(task) or dense.get(task) or {}).get("n_samples")
        for metric in dict.fromkeys([*ours, *theirs]):
            rows.append({**_row(task, metric, ours.get(metric), theirs.get(metric)), "samples": samples or ""})
    zero_shot = None
    if "zero_shot_mean" in compressed or "zero_shot_mean" in dense:
        zero_shot = _row(
            "zero_shot_mean", "acc_norm / acc", compressed.get("zero_shot_mean"), dense.get("zero_shot_mean")
        )
    return rows, zero_shot


def comparison_table(compressed: dict[str, Any], dense: dict[str, Any] | None = None) -> str:
    """The card's evaluation table as plain markdown (what `oats evaluate` prints)."""
    rows, zero_shot = comparison_rows(compressed, dense or {})
    if zero_shot:
        rows.append({**zero_shot, "samples": ""})
    header = ["| Task | Metric | Dense | Compressed | Δ | Samples |", "|---|---|---:|---:|---:|---:|"]
    keys = ("task", "metric", "dense", "compressed", "delta", "samples")
    return "\n".join(header + ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows])


# ----------------------------------------------------------------------------------------------- base model
def resolve_base_model(name: str | os.PathLike | None) -> str | None:
    """A Hub id for `base_model` metadata: Hub ids pass, the embedded default model maps to its Hub id."""
    if name is None:
        return None
    name = str(name)
    if name == "default":
        return DEFAULT_MODEL_HUB_ID
    path = Path(name).expanduser()
    if path.exists():
        return DEFAULT_MODEL_HUB_ID if path.resolve().name == DEFAULT_MODEL_NAME else None
    return name


def base_model_license(base_model: str, token: str | bool | None = None) -> str | None:
    """The base model's license: from the known table, else its Hub card; `None` when it cannot be found."""
    if base_model in KNOWN_LICENSES:
        return KNOWN_LICENSES[base_model]
    try:
        info = HfApi(token=token).model_info(base_model)
    except Exception as err:  # offline, gated, missing: the license is simply unknown
        logger.info("License of %s unknown (%s); using 'other'", base_model, type(err).__name__)
        return None
    card = info.card_data
    return getattr(card, "license", None) if card is not None else None
