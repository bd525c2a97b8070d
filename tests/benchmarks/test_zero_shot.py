"""`benchmarks/zero_shot.py`: the table it prints from stored `oats evaluate` results, and its model specs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest

from optimum_oats.evaluation import ZERO_SHOT_TASKS

pytestmark = pytest.mark.slow  # runs a benchmark script (tests/test_markers.py)


@pytest.fixture(scope="module")
def zero_shot():
    return importlib.import_module("zero_shot")  # benchmarks/ is on sys.path (tests/benchmarks/conftest.py)


def _store(folder: Path, name: str, value: float, stderr: float, tasks=ZERO_SHOT_TASKS) -> None:
    """An `oats evaluate --output` file: acc everywhere, acc_norm on arc_easy only."""
    results = {t: {"acc": value, "acc_stderr": stderr, "n_samples": 500} for t in tasks}
    if "arc_easy" in results:
        results["arc_easy"].update(acc_norm=value + 0.08, acc_norm_stderr=2 * stderr)
    (folder / f"{name}.json").write_text(json.dumps({"compressed": results}), encoding="utf-8")


def test_table_means_the_headline_metric_and_combines_the_errors(zero_shot, tmp_path):
    _store(tmp_path, "dense", 0.5, 0.02)
    _store(tmp_path, "hassle-refine64", 0.42, 0.01)
    _store(tmp_path, "wanda", 0.4, 0.01, tasks=ZERO_SHOT_TASKS[:3])  # unfinished: no mean
    args = argparse.Namespace(methods=["dense", "hassle+refine64", "wanda", "oats"], output=tmp_path)
    lines = zero_shot.table(args).splitlines()
    assert lines[0] == "| task | metric | n | dense | hassle+refine64 | wanda |"  # oats has no result yet
    arc = next(line for line in lines if line.startswith("| arc_easy "))
    assert "| acc_norm | 500 | 0.580 ± 0.040 | 0.500 ± 0.020 | - |" in arc
    mean_dense = (7 * 0.5 + 0.58) / 8
    error_dense = math.sqrt(7 * 0.02**2 + 0.04**2) / 8
    assert f"**{mean_dense:.4f}** ± {error_dense:.4f}" in lines[-3]
    assert lines[-3].endswith(" | - |")
    six_dense = (5 * 0.5 + 0.58) / 6  # boolq and rte left out
    assert lines[-2].startswith(f"| mean without boolq, rte | | | {six_dense:.4f} ± ")
    assert lines[-1] == f"| Δ mean vs dense | | | +0.0000 | {-0.08:+.4f} | - |"


@pytest.mark.parametrize("spec", ["hassle+refine", "dense+refine8", "gptq", "oats+refine-1"])
def test_bad_specs_are_refused(zero_shot, spec, monkeypatch):
    monkeypatch.setattr("sys.argv", ["zero_shot.py", "--methods", spec])
    with pytest.raises(SystemExit):
        zero_shot.parse_args()


def test_refinement_reaches_the_compress_command(zero_shot, tmp_path):
    args = argparse.Namespace(rate=0.6, rank_ratio=0.1, num_samples=4, seqlen=64, seed=3)
    command = zero_shot.compress_command("hassle+refine64", args, tmp_path / "x")
    assert command[1:5] == ["oats", "compress", "default", "-o"]
    assert command[command.index("--method") + 1] == "hassle"
    assert command[-2:] == ["--refine-steps", "64"]
    assert "--refine-steps" not in zero_shot.compress_command("sparsegpt", args, tmp_path / "y")
