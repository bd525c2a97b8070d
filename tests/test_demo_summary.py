"""The demo's summary marks accuracy differences that are within noise, and only those."""

from __future__ import annotations

import runpy
from pathlib import Path

SUMMARY = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "demo_summary.py"))


def _results(dense_acc: float, compressed_acc: float, n: int) -> dict:
    return {
        "dense": {"piqa": {"acc": dense_acc, "n_samples": n}},
        "compressed": {"piqa": {"acc": compressed_acc, "n_samples": n}},
    }


def test_a_difference_within_two_standard_errors_is_marked_as_noise():
    # boolq on 100 documents in the old demo: 0.38 -> 0.55 looked like a finding; two standard errors are ~0.14.
    (row,) = SUMMARY["_quality_rows"](_results(0.60, 0.55, 100))
    assert row.endswith("-0.050 (noise) |")
    (row,) = SUMMARY["_quality_rows"](_results(0.70, 0.55, 500))  # 0.15 against a bound of ~0.06
    assert row.endswith("-0.150 |")
