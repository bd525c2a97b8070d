"""The offline data folder of the benchmarks.

The folder is `$OATS_DATA_DIR` (`optimum_oats.data.paths`), or `../shared/data` beside the checkout when that
variable is unset and the folder exists, the layout of the project's development machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from optimum_oats.data.paths import DATA_DIR_ENV, resolve_data_dir

REPO = Path(__file__).resolve().parents[2]
BESIDE_CHECKOUT = REPO.parent / "shared" / "data"


def data_root(*, export: bool = False) -> Path:
    """The offline data folder; with `export`, also set `$OATS_DATA_DIR` so the library's calibration finds it.

    Exits with what to set when there is none.
    """
    try:
        root = resolve_data_dir(required=False)
        if root is None and BESIDE_CHECKOUT.is_dir():
            root = resolve_data_dir(BESIDE_CHECKOUT)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from error
    if root is None:
        raise SystemExit(
            f"Set {DATA_DIR_ENV} to the shared data folder (c4/, wikitext2/, sst2/, boolq/, ...); "
            f"{BESIDE_CHECKOUT} does not exist either."
        )
    if export:
        os.environ[DATA_DIR_ENV] = str(root)
    return root


def c4_sample(root: Path | None = None) -> Path:
    """The C4 sample the sweeps calibrate on (`c4/c4_sample.jsonl`, one `{"text": ...}` document a line)."""
    return (root or data_root()) / "c4" / "c4_sample.jsonl"
