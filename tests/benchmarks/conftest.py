"""The benchmark scripts and their shared `toolkit` package, importable as the scripts see them.

A script runs as `python benchmarks/NAME.py`, which puts `benchmarks/` first on `sys.path`; the tests do the same,
so `import toolkit.cells` and `importlib.import_module("quality")` find the files the scripts use.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
