"""Where the offline data (calibration and evaluation sets) lives.

The code never hard-codes a data location: it is given a folder (a function argument) or reads the
`OATS_DATA_DIR` environment variable. The folder has the layout described in `shared/data/README.md`
(`wikitext2/wiki.test.raw`, `boolq/val.jsonl`, `arc/ARC-Easy-Test.jsonl`, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "OATS_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None, required: bool = True) -> Path | None:
    """Return the offline data folder: `data_dir` if given, else `$OATS_DATA_DIR`.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            Explicit data folder. Takes precedence over the environment variable.
        required (`bool`, defaults to `True`):
            When no folder is configured, raise instead of returning `None`.

    Returns:
        `Path` or `None`: the folder, or `None` when none is configured and `required=False`.

    Raises:
        FileNotFoundError: the configured folder does not exist, or none is configured and `required=True`.
    """
    source = "data_dir argument"
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        source = f"${DATA_DIR_ENV}"
    if data_dir is None:
        if required:
            raise FileNotFoundError(
                f"No evaluation data folder configured: pass `data_dir=` or set the {DATA_DIR_ENV} environment "
                "variable to the folder holding wikitext2/, boolq/, arc/, ... (see shared/data/README.md)."
            )
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"Evaluation data folder {str(path)!r} (from {source}) does not exist.")
    return path


def data_dir() -> Path | None:
    """`$OATS_DATA_DIR` as a path, or None when unset (calibration then falls back to the Hub)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None
