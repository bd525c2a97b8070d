"""benchmarks/refine_block.py on the real SmolLM2 (tiny settings): its table holds what the docs quote."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a benchmark script (tests/test_markers.py)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "refine_block.py"


def run_refine_block(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def rows(stdout: str, block: int) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith(f"| {block} |")
    ]


def test_every_method_and_setting_has_a_row_and_refinement_never_raises_the_calibration_loss():
    args = ["--blocks", "1", "--num-samples", "2", "--held-out", "1", "--seqlen", "64", "--steps", "3"]
    result = run_refine_block([*args, "--settings", "1e-3", "1e-3:0"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = rows(result.stdout, 1)
    ratios = table[-1:]  # the summary table's row: hassle / sparsegpt per setting
    table = table[:-1]
    assert [(r[1], r[2], r[3]) for r in table] == [
        (m, lr, u) for m in ("sparsegpt", "hassle") for lr, u in (("start", ""), ("0.001", ""), ("0.001", "0"))
    ]
    for method in ("sparsegpt", "hassle"):
        start, *refined = [r for r in table if r[1] == method]
        for row in refined:
            assert float(row[4]) <= float(start[4])  # calibration loss
            assert abs(float(row[6]) - float(row[5]) / float(start[5])) < 2e-3 * float(row[6]) + 1e-3
    held = {(r[1], r[3]): float(r[5]) for r in table if r[2] == "0.001"}
    assert ratios[0][1] == f"{held['hassle', ''] / held['sparsegpt', '']:.3f}"


def test_a_malformed_setting_is_refused_with_the_expected_form():
    result = run_refine_block(["--settings", "fast"])
    assert result.returncode == 2
    assert "expected LR or LR:LOWRANK_LR" in result.stderr
