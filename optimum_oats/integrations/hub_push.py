"""transformers' own `push_to_hub` of a compressed model: the token blanked wherever it could leak, and our card.

`model.push_to_hub(...)` (and `save_pretrained(..., push_to_hub=True)`, which calls it) talk to the Hub through
transformers and `huggingface_hub`, whose errors and DEBUG logs quote what the server answered; a server or proxy
that echoes the Authorization header would put the token on the console. While a compressed model pushes, every
logging handler blanks the token and the raised exception (with its causes) is scrubbed, as `publish` does.

The model card: transformers builds a stub card in `create_and_tag_model_card`; during the push of a compressed
model with no card in the repository yet, the builder a higher level registered in `CARD_BUILDERS` (the OATS card of
`optimum_oats.hub.autocard`) answers instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from ..utils.redact import redacted_logs, scrub_exception, secrets_in_use
from .patching import Patch
from .transformers import is_oats_model

# `builder(model, repo_id) -> ModelCard`; the last one registered is used.
CARD_BUILDERS: list[Callable[[Any, str], Any]] = []
_PUSHING: ContextVar[Any] = ContextVar("optimum_oats_pushing", default=None)


def _wrap_push_to_hub(original: Callable) -> Callable:
    @functools.wraps(original)
    def push_to_hub(self, *args: Any, **kwargs: Any):
        if not is_oats_model(self):
            return original(self, *args, **kwargs)
        secrets = secrets_in_use(kwargs.get("token"))
        pushing = _PUSHING.set(self)
        try:
            with redacted_logs(secrets):
                return original(self, *args, **kwargs)
        except BaseException as err:
            scrub_exception(err, secrets)  # what a traceback of it prints: its message and every chained cause
            raise
        finally:
            _PUSHING.reset(pushing)

    return push_to_hub


def _wrap_card(original: Callable) -> Callable:
    @functools.wraps(original)
    def create_and_tag_model_card(repo_id: str, tags: list[str] | None = None, token: str | None = None, **kwargs):
        model = _PUSHING.get()
        if model is None or not CARD_BUILDERS:
            return original(repo_id, tags, token=token, **kwargs)
        from huggingface_hub import ModelCard
        from huggingface_hub.errors import EntryNotFoundError

        try:
            ModelCard.load(repo_id, token=token)
        except EntryNotFoundError:  # no card in the repository yet: ours
            card = CARD_BUILDERS[-1](model, repo_id)
            card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *(tags or [])]))
            return card
        return original(repo_id, tags, token=token, **kwargs)  # the repository's own card, tagged as usual

    return create_and_tag_model_card


PUSH_TO_HUB = Patch(
    name="push_to_hub",
    attribute="push_to_hub",
    owners=("transformers.PreTrainedModel",),
    wrap=_wrap_push_to_hub,
    signatures={
        "transformers.PreTrainedModel.push_to_hub": "(self, *args, **kwargs)",
        "transformers.utils.hub.PushToHubMixin.push_to_hub": (
            "(self, repo_id, *, commit_message=None, commit_description=None, private=None, token=None, "
            "revision=None, create_pr=False, max_shard_size='50GB', tags=None)"
        ),
    },
    effect=(
        "the Hub token is blanked in the logs and errors of a compressed model's push, and the OATS card is used; "
        "without it, what transformers and huggingface_hub print is theirs, and the card is transformers' stub"
    ),
)
MODEL_CARD = Patch(
    name="create_and_tag_model_card",
    attribute="create_and_tag_model_card",
    owners=("transformers.utils.hub", "transformers.modeling_utils"),
    wrap=_wrap_card,
    signatures={
        "transformers.utils.hub.create_and_tag_model_card": "(repo_id, tags=None, token=None)",
        "transformers.modeling_utils.create_and_tag_model_card": "(repo_id, tags=None, token=None)",
    },
    effect=(
        "during a compressed model's `push_to_hub`, a repository without a card gets the OATS card; outside such a "
        "push it calls transformers' own; without it, the pushed card is transformers' stub"
    ),
)
