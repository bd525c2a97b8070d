"""Keep Hub tokens out of error messages, tracebacks and log output.

Our own messages never quote a token, but the Hub (or a proxy in front of it) may quote the request it refused,
and that text travels in the exceptions we chain and in the DEBUG logs of the HTTP libraries. Everything that
leaves a push passes through here first: `publish`/`oats push` and transformers' own `push_to_hub` on a compressed
model (`integrations/hub_push.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

MASK = "***"


def secrets_in_use(token: str | bool | None = None) -> set[str]:
    """The token passed explicitly and the one `huggingface_hub` would find (HF_TOKEN, `hf auth login`)."""
    from huggingface_hub import get_token

    found = {token if isinstance(token, str) else None, get_token()}
    return {secret for secret in found if secret}


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def scrub_exception(error: BaseException, secrets: Iterable[str]) -> None:
    """Blank the secrets in `error` and in every cause and context a traceback of it would print, in place."""
    secrets = [s for s in secrets if s]
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.args = tuple(scrub(arg, secrets) if isinstance(arg, str) else arg for arg in current.args)
        notes = getattr(current, "__notes__", None)
        if isinstance(notes, list):
            current.__notes__ = [scrub(note, secrets) if isinstance(note, str) else note for note in notes]
        for name, value in list(vars(current).items()):  # e.g. `HfHubHTTPError.server_message`
            if isinstance(value, str) and name != "__notes__":
                setattr(current, name, scrub(value, secrets))
        pending += [current.__cause__, current.__context__]


class _RedactingFilter(logging.Filter):
    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(secret in message for secret in self.secrets):
            record.msg, record.args = scrub(message, self.secrets), None
        return True


@contextmanager
def redacted_logs(secrets: Iterable[str]) -> Iterator[None]:
    """While active, every handler of the root logger (and of loggers that do not propagate) blanks the secrets.

    Handler filters see records propagated from every library, including the HTTP clients' DEBUG traces of
    response headers, which logger filters would not.
    """
    redactor = _RedactingFilter(secrets)
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and logger.handlers
    ]
    handlers = [handler for logger in loggers for handler in logger.handlers]
    if logging.lastResort is not None:  # what prints WARNING and above where no logging is set up
        handlers.append(logging.lastResort)
    handlers = list(dict.fromkeys(handlers))
    for handler in handlers:
        handler.addFilter(redactor)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(redactor)
