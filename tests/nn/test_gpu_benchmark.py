"""Smoke test of benchmarks/gpu.py in its tiny CPU configuration: every section runs and writes its JSON.

The GPU numbers come from one run on an H100/H200 (scripts/gpu_check.sh); this keeps the script runnable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a benchmark script (tests/test_markers.py)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "OATS_DISABLE_KERNELS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == {}
    assert data["check"]["all_ok"] and len(data["check"]["rows"]) == 4 * 3 + 1
    layers = data["layers"]
    assert {row["tokens"] for row in layers} == {1, 4, 16, 32, 64}
    assert all(row["eager_us_dense"] > 0 and row["eager_us_compressed"] > 0 for row in layers)
    assert all(0.5 < row["bytes_ratio"] < 0.6 for row in layers)  # rho 0.5: values + bitmask + factors
    model = data["model"]
    assert model["layers_replaced"] == 2 * 7
    assert model["compressed"]["linear_bytes"] < 0.6 * model["dense"]["linear_bytes"]
    assert model["dense"]["new_tokens"] == model["compressed"]["new_tokens"] == 8
    methods = {row["method"]: row for row in data["compress"]["rows"]}
    assert set(methods) == {"oats", "hassle", "sparsegpt", "wanda"}
    assert all(row["seconds"] > 0 and row["layers"] == 7 for row in methods.values())
    assert "### Per-layer time" in result.stdout and "### Compression wall time" in result.stdout
