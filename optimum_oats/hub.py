"""Model cards and one-commit publishing of compressed checkpoints to the Hugging Face Hub.

`render_model_card` is pure (report + numbers in, `ModelCard` out), so a card can be reviewed or tested without a
model or a network. `publish` / `publish_folder` stage every file (checkpoint, tokenizer, `README.md`, the per-layer
plot, `eval_results.json`) in a temporary folder and upload it in a single commit: a failed push leaves nothing
half-written, neither on the Hub nor in the caller's folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from .plotting import as_report, plot_layer_report
from .redact import redacted_logs, scrub, scrub_exception, secrets_in_use
from .report import REPORT_FILE, CompressionReport
from .tasks import CAUSAL_LM, ModelTask, model_task

if TYPE_CHECKING:
    from transformers import PreTrainedModel

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
_METHOD_LABELS = {
    "oats": "OATS, sparse + low-rank",
    "wanda": "Wanda pruning",
    "sparsegpt": "SparseGPT pruning",
    "magnitude": "magnitude pruning",
}
_NON_METRICS = frozenset({"n_samples", "seqlen", "max_windows", "limit"})
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


class PublishError(RuntimeError):
    """Pushing to the Hub failed; the message says at which step and why (never with the token)."""


# ----------------------------------------------------------------------------------------------- card rendering
def model_card_template() -> str:
    """The Jinja template shipped in `optimum_oats/templates/` (`model_cards/` at the repo root links to it)."""
    return resources.files("optimum_oats").joinpath("templates", TEMPLATE_FILE).read_text(encoding="utf-8")


def render_model_card(
    report: CompressionReport | dict[str, Any],
    *,
    base_model: str,
    eval_results: dict[str, Any] | None = None,
    dense_results: dict[str, Any] | None = None,
    plot_path: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's metadata field name
    repo_id: str | None = None,
    model_name: str | None = None,
    task: ModelTask | None = None,
) -> ModelCard:
    """Render the model card of a compressed checkpoint. Pure: reads only the packaged template, no network.

    Args:
        report: the `CompressionReport`, or the dict of an `oats_report.json`.
        base_model: Hub id of the dense model that was compressed.
        eval_results / dense_results: `{task: {metric: value, "n_samples": n}, "zero_shot_mean": x}` of the
            compressed / dense model (the output of `evaluate_lm_eval`, plus `{"wikitext2": {"token_perplexity": p}}`).
            The compressed numbers go to the `model-index` metadata, both into a side-by-side table.
        plot_path: path of the per-layer PNG inside the repo, embedded as an image.
        license: the license; defaults to the base model's when known, else `"other"`.
        repo_id: used in the loading snippet.
        model_name: name in the `model-index`; defaults to the repo name, else `<base>-oats`.
        task: how the checkpoint loads (Auto class, pipeline tag, tokenizer or image processor), from
            `tasks.model_task`; defaults to a causal LM.
    """
    task = task or CAUSAL_LM
    report = as_report(report)
    config = report.config
    name = model_name or (repo_id.split("/")[-1] if repo_id else f"{base_model.split('/')[-1]}-oats")
    method = config.get("method", "oats")
    tags = [*TAGS, *([method] if method not in TAGS else [])]
    results = _eval_results(eval_results or {})
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation=BASE_MODEL_RELATION,
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
        method_label=_METHOD_LABELS.get(method, method),
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
    }


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
        if metric not in _NON_METRICS
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
        from .default_model import DEFAULT_MODEL_NAME

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


# ----------------------------------------------------------------------------------------------- publishing
def publish(
    model: PreTrainedModel,
    repo_id: str,
    *,
    tokenizer: Any = None,
    eval_results: dict[str, Any] | None = None,
    dense_results: dict[str, Any] | None = None,
    base_model: str | None = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's metadata field name
) -> str:
    """Push a compressed model, its tokenizer, model card, plot and evaluation results in one commit.

    `base_model` defaults to the Hub id the model was loaded from (or the embedded default model's id).

    Returns:
        `str`: the URL of the commit.

    Raises:
        PublishError: the Hub refused or could not be reached; nothing was committed.
    """
    from .integration import is_oats_model

    if not is_oats_model(model):
        raise ValueError("`publish` expects a model compressed with optimum_oats (its config has no OATS config).")
    validate_repo_id(repo_id)
    base_model = base_model or resolve_base_model(getattr(model, "name_or_path", None))
    with tempfile.TemporaryDirectory(prefix="oats-publish-") as tmp:
        staging = Path(tmp) / "repo"
        model.save_pretrained(staging)  # writes oats_report.json too
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        return _publish_staged(
            staging, repo_id, eval_results, dense_results, base_model, token, private, commit_message, license
        )


def publish_folder(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    eval_results: dict[str, Any] | None = None,
    dense_results: dict[str, Any] | None = None,
    base_model: str | None = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's metadata field name
) -> str:
    """`publish` for a checkpoint folder already saved by `save_pretrained`; the folder is only read."""
    validate_repo_id(repo_id)
    directory = Path(directory)
    if not (directory / REPORT_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} has no {REPORT_FILE}: it is not a checkpoint saved by optimum_oats (compress it first)."
        )
    with tempfile.TemporaryDirectory(prefix="oats-publish-") as tmp:
        staging = Path(tmp) / "repo"
        shutil.copytree(directory, staging, ignore=_hidden_and_generated, copy_function=_link_or_copy)
        return _publish_staged(
            staging, repo_id, eval_results, dense_results, base_model, token, private, commit_message, license
        )


def _hidden_and_generated(_: str, names: list[str]) -> set[str]:
    return {name for name in names if name.startswith(".") or name in (CARD_FILE, PLOT_FILE, EVAL_FILE)}


def _link_or_copy(src: str, dst: str) -> str:
    """Hard links make staging a multi-GB checkpoint free; across file systems fall back to a copy."""
    try:
        os.link(src, dst)
        return dst
    except OSError:
        return shutil.copy2(src, dst)


def _publish_staged(
    staging: Path,
    repo_id: str,
    eval_results: dict[str, Any] | None,
    dense_results: dict[str, Any] | None,
    base_model: str | None,
    token: str | None,
    private: bool,
    commit_message: str | None,
    license: str | None,  # noqa: A002
) -> str:
    if not base_model:
        raise ValueError(
            "The Hub id of the dense base model is unknown (the model was loaded from a local folder): "
            "pass `base_model=` (`--base-model` on the command line)."
        )
    report = json.loads((staging / REPORT_FILE).read_text(encoding="utf-8"))
    model_config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    architecture = (model_config.get("architectures") or [None])[0]
    task = model_task(architecture, model_config.get("model_type"))
    plot_layer_report(report, staging / PLOT_FILE)
    if eval_results or dense_results:
        payload = {"base_model": base_model, "compressed": eval_results or {}, "dense": dense_results or {}}
        (staging / EVAL_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    card = render_model_card(
        report,
        base_model=base_model,
        eval_results=eval_results,
        dense_results=dense_results,
        plot_path=PLOT_FILE,
        license=license or base_model_license(base_model, token),
        repo_id=repo_id,
        task=task,
    )
    card.save(staging / CARD_FILE)
    return _upload(staging, repo_id, token=token, private=private, commit_message=commit_message)


def _upload(folder: Path, repo_id: str, *, token: str | None, private: bool, commit_message: str | None) -> str:
    # The HTTP libraries' DEBUG traces and the errors they raise may quote what the Hub (or a proxy) echoes back.
    with redacted_logs(secrets_in_use(token)):
        info = _commit(folder, repo_id, token=token, private=private, commit_message=commit_message)
    logger.info("Pushed %d files to %s in commit %s", sum(1 for _ in folder.iterdir()), repo_id, info.oid)
    return info.commit_url


def _commit(folder: Path, repo_id: str, *, token: str | None, private: bool, commit_message: str | None):
    api = HfApi(token=token)
    step = "creating the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        step = "uploading the files"
        return api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            commit_message=commit_message or "Upload OATS-compressed model (optimum-oats)",
            delete_patterns=["model*.safetensors*"],  # shards of an earlier push that this one does not replace
        )
    except HfHubHTTPError as err:
        scrub_exception(err, secrets_in_use(token))  # the chained cause is printed with any traceback
        raise PublishError(_scrub(_describe_http_error(err, repo_id, step), token)) from err
    except Exception as err:  # transport errors (connection refused, timeout, proxy): the Hub was not reached
        scrub_exception(err, secrets_in_use(token))
        raise PublishError(
            _scrub(
                f"Pushing to {repo_id!r} failed while {step}: could not reach the Hub at {api.endpoint} "
                f"({type(err).__name__}: {err}). {_NOTHING_CHANGED}",
                token,
            )
        ) from err


_NOTHING_CHANGED = "Nothing was committed, and the local files are unchanged."


def _describe_http_error(err: HfHubHTTPError, repo_id: str, step: str) -> str:
    status = err.response.status_code if err.response is not None else None
    detail = err.server_message or str(err).splitlines()[0]
    hint = {
        401: " Check the token (HF_TOKEN or `hf auth login`).",
        403: " The token has no write access to this repository or namespace.",
        404: " The repository or namespace does not exist, or the token cannot see it.",
        409: " The repository changed meanwhile; push again.",
        412: " The repository changed meanwhile; push again.",
    }.get(status, " The Hub may be unavailable; try again later." if status and status >= 500 else "")
    return f"Pushing to {repo_id!r} failed while {step}: HTTP {status} ({detail}).{hint} {_NOTHING_CHANGED}"


def _scrub(message: str, token: str | None) -> str:
    """Remove any token from a message that may quote a request (defence in depth: none is expected)."""
    return scrub(message, secrets_in_use(token))
