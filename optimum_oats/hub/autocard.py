"""This package's model card on every `save_pretrained` / `push_to_hub` of a compressed model.

The card is the one `publish` writes (summary, per-layer table, and the Hub's `model-index` when evaluation results
are known), unless the user has a card of their own: a `README.md` already in the target folder, or one already in
the Hub repository. Results are known when the model carries them (`model.oats_eval_results`, as
`{"compressed": {...}, "dense": {...}}`) or when `optimum-cli oats evaluate` saved an `eval_results.json` beside the
checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from torch import nn

from ..engine.report import CompressionReport
from ..integrations.auto_classes import model_task
from ..integrations.hub_push import CARD_BUILDERS
from ..integrations.transformers import SAVE_HOOKS
from ..utils.files import atomic_write_json
from .card import CARD_FILE, EVAL_FILE, CardDetails, render_model_card, resolve_base_model

# The model attribute holding evaluation results for the card: `{"compressed": {...}, "dense": {...}}`.
EVAL_ATTR = "oats_eval_results"


def known_results(model: nn.Module, folder: Path | None = None) -> dict[str, Any]:
    """`{"compressed": ..., "dense": ...}` from the model, else from `eval_results.json` in `folder`, else empty."""
    attached = getattr(model, EVAL_ATTR, None)
    if attached:
        return dict(attached)
    path = folder / EVAL_FILE if folder is not None else None
    if path is not None and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"compressed": data.get("compressed") or {}, "dense": data.get("dense") or {}}
    return {}


def card_for(model: nn.Module, repo_id: str | None = None, folder: Path | None = None) -> ModelCard:
    """The OATS card of a compressed model in memory (pure apart from reading `folder`'s results file)."""
    results = known_results(model, folder)
    config = model.config
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    details = CardDetails(
        base_model=resolve_base_model(getattr(model, "name_or_path", None)),
        eval_results=results.get("compressed") or None,
        dense_results=results.get("dense") or None,
        repo_id=repo_id,
        task=model_task(architecture, getattr(config, "model_type", None)),
    )
    return render_model_card(CompressionReport.from_model(model), details)


def write_card(model: nn.Module, staging: Path, target: Path) -> None:
    """The save hook: a card (and the results it shows) in the staged checkpoint, unless `target` has a card."""
    if (target / CARD_FILE).exists():
        return
    card_for(model, folder=target).save(staging / CARD_FILE)
    results = known_results(model, target)
    if results and not (target / EVAL_FILE).exists():
        atomic_write_json(staging / EVAL_FILE, results)


def _push_card(model: nn.Module, repo_id: str) -> ModelCard:
    return card_for(model, repo_id=repo_id)


def install() -> None:
    """Write the OATS card on save and push (idempotent); called when `optimum_oats` is imported.

    The hooks run inside the `save_pretrained` and `push_to_hub` patches of `optimum_oats.integrations`, and not at
    all where `OATS_NO_PATCH` turns those off.
    """
    if write_card not in SAVE_HOOKS:
        SAVE_HOOKS.append(write_card)
    if _push_card not in CARD_BUILDERS:
        CARD_BUILDERS.append(_push_card)
