"""One-commit publishing of compressed checkpoints to the Hugging Face Hub.

`publish` / `publish_folder` stage every file (checkpoint, tokenizer, `README.md`, the per-layer plot,
`eval_results.json`) in a temporary folder and upload it in a single commit: a failed push leaves nothing
half-written, neither on the Hub nor in the caller's folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from ..engine.report import REPORT_FILE
from ..integrations.auto_classes import model_task
from ..integrations.transformers import is_oats_model
from ..utils.files import atomic_write_json
from ..utils.redact import redacted_logs, scrub, scrub_exception, secrets_in_use
from .card import (
    CARD_FILE,
    EVAL_FILE,
    PLOT_FILE,
    CardDetails,
    base_model_license,
    render_model_card,
    resolve_base_model,
)
from .plots import plot_layer_report

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """Pushing to the Hub failed; the message says at which step and why (never with the token)."""


def publish(
    model: PreTrainedModel,
    repo_id: str,
    *,
    tokenizer: Any = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    **card: Any,
) -> str:
    """Push a compressed model, its tokenizer, model card, plot and evaluation results in one commit.

    Args:
        card: fields of [`CardDetails`] (`eval_results`, `dense_results`, `base_model`, `license`).
            `base_model` defaults to the Hub id the model was loaded from (or the embedded default model's id).

    Returns:
        `str`: the URL of the commit.

    Raises:
        PublishError: the Hub refused or could not be reached; nothing was committed.
    """
    if not is_oats_model(model):
        raise ValueError("`publish` expects a model compressed with optimum_oats (its config has no OATS config).")
    validate_repo_id(repo_id)
    details = CardDetails(**card)
    details = replace(
        details, base_model=details.base_model or resolve_base_model(getattr(model, "name_or_path", None))
    )
    with tempfile.TemporaryDirectory(prefix="oats-publish-") as tmp:
        staging = Path(tmp) / "repo"
        model.save_pretrained(staging)  # writes oats_report.json too
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        return _publish_staged(staging, repo_id, details, token=token, private=private, commit_message=commit_message)


def publish_folder(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    **card: Any,
) -> str:
    """`publish` for a checkpoint folder already saved by `save_pretrained`; the folder is only read."""
    validate_repo_id(repo_id)
    details = CardDetails(**card)
    directory = Path(directory)
    if not (directory / REPORT_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} has no {REPORT_FILE}: it is not a checkpoint saved by optimum_oats (compress it first)."
        )
    with tempfile.TemporaryDirectory(prefix="oats-publish-") as tmp:
        staging = Path(tmp) / "repo"
        shutil.copytree(directory, staging, ignore=_hidden_and_generated, copy_function=_link_or_copy)
        return _publish_staged(staging, repo_id, details, token=token, private=private, commit_message=commit_message)


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
    staging: Path, repo_id: str, details: CardDetails, *, token: str | None, private: bool, commit_message: str | None
) -> str:
    base_model = details.base_model
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
    if details.eval_results or details.dense_results:
        payload = {
            "base_model": base_model,
            "compressed": details.eval_results or {},
            "dense": details.dense_results or {},
        }
        atomic_write_json(staging / EVAL_FILE, payload)
    card = render_model_card(
        report,
        replace(
            details,
            plot_path=PLOT_FILE,
            license=details.license or base_model_license(base_model, token),
            repo_id=repo_id,
            task=task,
        ),
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
    step, created = "creating the repository", False
    try:
        created = _create(api, repo_id, private)
        step = "uploading the files"
        return api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            commit_message=commit_message or "Upload OATS-compressed model (optimum-oats)",
            delete_patterns=["model*.safetensors*"],  # shards of an earlier push that this one does not replace
        )
    except Exception as err:
        scrub_exception(err, secrets_in_use(token))  # the chained cause is printed with any traceback
        cleanup = _remove_created(api, repo_id) if created else ""
        http = _http_error_in(err)
        if http is not None:  # LFS uploads wrap the Hub's answer in a RuntimeError: it still answered
            message = _describe_http_error(http, repo_id, step)
        else:  # transport errors (connection refused, timeout, proxy): the Hub was not reached
            message = (
                f"Pushing to {repo_id!r} failed while {step}: could not reach the Hub at {api.endpoint} "
                f"({type(err).__name__}: {err}). {_NOTHING_CHANGED}"
            )
        raise PublishError(_scrub(message + cleanup, token)) from err


def _create(api: HfApi, repo_id: str, private: bool) -> bool:
    """Create the repository if it does not exist; True when this call created it (so a failed push removes it)."""
    try:
        api.create_repo(repo_id, private=private)
        return True
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        # 409: it exists. 401-403: no right to create here, yet it may exist (as `create_repo(exist_ok=True)` sees it).
        if status == 409 or (status in (401, 402, 403) and api.repo_exists(repo_id)):
            return False
        raise


def _http_error_in(error: BaseException) -> HfHubHTTPError | None:
    """The Hub's HTTP error that `error` is or was raised from, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, HfHubHTTPError) and current.response is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _remove_created(api: HfApi, repo_id: str) -> str:
    """Delete the repository this push created (it holds nothing of ours), so a failed push leaves no empty repo."""
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception as err:  # noqa: BLE001 - the push error matters more; say what is left
        logger.warning("Could not delete the empty repository %s created for the failed push: %s", repo_id, err)
        return f" The repository {repo_id!r} created for this push is still there, empty: delete it on the Hub."
    return f" The repository {repo_id!r} created for this push was deleted again."


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
