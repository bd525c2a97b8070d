"""Resumable result cells: one JSON file per cell, written atomically, read back instead of computed again.

A benchmark that runs for hours stores each finished unit of work (a method at a rate, a stage, a seed) as its own
JSON file as soon as it ends, so a stopped run resumes where it left off. The write goes through
`optimum_oats.utils.files.atomic_write_json` (a temporary sibling, fsync, one rename), so a file is either absent or
whole; a file that does not parse as a JSON object (left half-written by an older writer that was not atomic) does
not count as finished and is computed again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def read_cell(file: str | os.PathLike) -> dict | None:
    """The stored record of a finished cell, or None when it is missing or not a whole JSON object."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        logger.warning("%s is not a whole JSON record (a writer stopped half-way?): computing it again", file)
        return None
    return record if isinstance(record, dict) else None


def write_cell(file: str | os.PathLike, record: dict) -> Path:
    """Store `record` at `file` atomically (the folder must exist)."""
    from optimum_oats.utils.files import atomic_write_json  # not at module level: see the package docstring

    return atomic_write_json(file, record)


def resume_cell(file: str | os.PathLike, compute: Callable[[], dict | None]) -> dict | None:
    """The stored record of `file` if the cell is finished, else `compute()`, stored before it is returned.

    `compute` may return None for a cell that cannot run now (e.g. a table-only run): nothing is stored.
    """
    record = read_cell(file)
    if record is not None:
        return record
    record = compute()
    if record is not None:
        write_cell(file, record)
    return record


def write_figure(figure: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """Save a matplotlib `figure` to `path` atomically (a reader never sees half a PNG); returns `path`."""
    from optimum_oats.utils.files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    savefig.setdefault("format", path.suffix.lstrip(".") or "png")
    return atomic_write(path, lambda tmp: figure.savefig(tmp, **savefig), fsync=False)
