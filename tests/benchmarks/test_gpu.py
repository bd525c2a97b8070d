"""The CPU rehearsal of the one GPU run: `scripts/gpu_check.sh` end to end with `GPU_CHECK_DEVICE=cpu` (tiny
shapes, Triton through its interpreter), so that on the GPU only the hardware is new.

It must exit 0, write every section's JSON (each compress method's row included), keep its per-layer table's rows as
wide as its header, and print the summary (under 12 KB) last. The GPU numbers come from one run on an H100/H200.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a benchmark script (tests/test_markers.py)

REPO_ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("triton", reason="the rehearsal runs the Triton paths through the interpreter")


def test_gpu_check_rehearsal_on_cpu(tmp_path):
    env = {
        **os.environ,
        "GPU_CHECK_DEVICE": "cpu",
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=900, env=env
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # The summary is printed last, whole, and fits in what the device tool returns.
    summary = (tmp_path / "gpu.summary.md").read_text()
    assert len(summary) < 12_000 and output.rstrip().endswith("=== END SUMMARY ===")
    assert output.rstrip()[-len(summary.strip()) :] == summary.strip()
    assert set(p.name for p in tmp_path.iterdir()) <= {
        "env.txt",
        "tests.log",
        "decisive.xml",
        "rest.xml",
        "gpu.log",
        "gpu.json",
        "gpu.summary.md",
        "tables.md",
    }  # fmt: skip  (the device tool brings back at most 8 files)
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["errors"] == {}
    assert data["env"]["copy_bytes_per_s"] > 0 and data["env"]["triton_interpret"] == "1"
    assert data["check"]["all_ok"] and len(data["check"]["rows"]) == 4 * 3 + 3 + 1  # + the quantized q/o, 2:4
    assert [row["tokens"] for row in data["check"]["rows"] if row["shape"] == "q/o 4-bit"] == [1, 16, 32]
    layers = data["layers"]
    assert {row["tokens"] for row in layers} == {1, 4, 16, 32, 64}
    assert all(row["eager_us_dense"] > 0 and row["eager_us_compressed"] > 0 for row in layers)
    assert all(0.5 < row["bytes_ratio"] < 0.7 for row in layers)  # rho 0.5: values + bitmask + factors + tables
    # The quantized column (rho 0.3, 4-bit values, 8-bit U V): timed through the dispatch, smaller than the float one.
    assert all(row["eager_us_quantized"] > 0 and row["path_quantized"] == row["path"] for row in layers)
    assert all(0.2 < row["bytes_ratio_quantized"] < row["bytes_ratio"] for row in layers)
    assert {row["path"] for row in layers} == {"cpu_kernel", "workspace"}
    forced = [row for row in layers if "eager_us_decode" in row]  # the Triton paths, through the interpreter
    assert forced and all(row["eager_us_workspace"] > 0 and row["decode_config"] for row in forced)
    assert layers[0]["decompress_us"] > 0 and "suggested_GPU_MAX_DECODE_TOKENS" in data["crossover"]
    model = data["model"]
    assert model["layers_replaced"] == 2 * 7
    assert model["compressed"]["linear_bytes"] < 0.6 * model["dense"]["linear_bytes"]
    assert model["dense"]["new_tokens"] == model["compressed"]["new_tokens"] == model["quantized"]["new_tokens"] == 8
    assert model["quantized"]["linear_bytes"] < model["compressed"]["linear_bytes"]
    assert len(data["svd"]) == 2 and all(row["exact_s"] > 0 for row in data["svd"])
    methods = [row["method"] for row in data["compress"]["rows"]]
    assert methods == ["wanda", "sparsegpt", "oats", "hassle"]  # cheapest first
    assert all(row["seconds"] > 0 and row["layers"] == 7 for row in data["compress"]["rows"])
    tables = (tmp_path / "tables.md").read_text().splitlines()
    header = next(line for line in tables if line.startswith("| shape | tokens | path | bytes vs dense |"))
    rows = [line for line in tables if line.startswith("| q/o 64x64 |")]
    assert rows and all(line.count("|") == header.count("|") for line in rows)  # as many cells as the header
