"""Every change this package makes to transformers, in one list, each with an opt-out.

Importing `optimum_oats` applies them all except those named in the environment variable `OATS_NO_PATCH`
(comma-separated names, or `all`), read at import time. In a running process, `undo_patches("push_to_hub")` restores
transformers' own method and `apply_patches("push_to_hub")` puts ours back. The patches only change what happens to
OATS-compressed models (or, for `from_pretrained`, the `oats_config=` keyword); other models go straight through.

| name | replaces | effect |
|---|---|---|
| `from_pretrained` | `PreTrainedModel.from_pretrained` | accepts `oats_config=` and `oats_verify=` |
| `save_pretrained` | `PreTrainedModel.save_pretrained` | staged, whole save with report, remote code, card, records |
| `push_to_hub` | `PreTrainedModel.push_to_hub` | the token blanked in logs and errors; our card |
| `create_and_tag_model_card` | `transformers.utils.hub` / `modeling_utils` functions | our card during our pushes |

Registering the `"oats"` quantization method uses transformers' public registry and is not a patch.
"""

from __future__ import annotations

import os
import warnings

from .hub_push import MODEL_CARD, PUSH_TO_HUB
from .patching import Patch
from .transformers import FROM_PRETRAINED, SAVE_PRETRAINED

OPT_OUT_ENV = "OATS_NO_PATCH"
PATCHES: dict[str, Patch] = {p.name: p for p in (FROM_PRETRAINED, SAVE_PRETRAINED, PUSH_TO_HUB, MODEL_CARD)}


def _named(names: tuple[str, ...] | list[str]) -> list[Patch]:
    unknown = sorted(set(names) - set(PATCHES))
    if unknown:
        raise ValueError(f"Unknown patch name(s) {unknown}; the patches are {sorted(PATCHES)}.")
    return [PATCHES[name] for name in names]


def opted_out() -> set[str]:
    """The patch names `OATS_NO_PATCH` turns off (`all` or `1`: every one); unknown names are warned about."""
    value = os.environ.get(OPT_OUT_ENV, "").strip()
    if value.lower() in ("all", "1", "true", "yes"):
        return set(PATCHES)
    names = {name.strip() for name in value.split(",") if name.strip()}
    if names - set(PATCHES):
        warnings.warn(
            f"`{OPT_OUT_ENV}={value}` names {sorted(names - set(PATCHES))}, which are not patches of optimum_oats; "
            f"use `all` or some of {sorted(PATCHES)}.",
            stacklevel=2,
        )
    return names & set(PATCHES)


def apply_patches(*names: str) -> None:
    """Apply the named patches, or with no names every patch `OATS_NO_PATCH` does not turn off (idempotent)."""
    for patch in _named(names) if names else [p for n, p in PATCHES.items() if n not in opted_out()]:
        patch.apply()


def undo_patches(*names: str) -> None:
    """Restore transformers' own attributes for the named patches, or for all of them."""
    for patch in _named(names) if names else list(PATCHES.values()):
        patch.undo()


def applied_patches() -> set[str]:
    return {name for name, patch in PATCHES.items() if patch.applied}
