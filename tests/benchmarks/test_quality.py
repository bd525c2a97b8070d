"""benchmarks/quality.py --table-only: the paired-by-seed ratio and its interval, and the seed-aggregated plot.

The stored results are written by the test (made-up perplexities); what is checked is the arithmetic the
docs quote (geometric mean and 95% t interval of per-seed ratios) and that the plot renders several seeds.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import t as student_t

pytestmark = pytest.mark.slow  # runs a benchmark script (tests/test_markers.py)

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
SWEEP = ["--num-samples", "16", "--seqlen", "1024", "--eval-seqlen", "1024", "--windows", "16", "--svd", "fast"]


def store(folder: Path, key: str, perplexity: float) -> None:
    record = {"perplexity": perplexity, "seconds": 1.0, "kept_fraction": 0.3, "mean_relative_error": 0.3}
    (folder / f"{key}.json").write_text(json.dumps(record))


def run_quality(args: list[str]) -> subprocess.CompletedProcess:
    """benchmarks/quality.py in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "quality.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_table_only_pairs_by_seed_and_plots_the_seed_mean(tmp_path):
    (tmp_path / "dense.json").write_text(json.dumps({"perplexity": 20.0, "seconds": 0.0}))
    sparsegpt, hassle = [300.0, 330.0, 280.0], [240.0, 250.0, 250.0]
    for seed, (base, new) in enumerate(zip(sparsegpt, hassle, strict=True)):
        suffix = f"-s{seed}" if seed else ""
        store(tmp_path, f"sparsegpt-uniform-0.7{suffix}", base)
        store(tmp_path, f"hassle-uniform-0.7-fast-k0.1-h2{suffix}", new)
    plot = tmp_path / "plot.png"
    args = [*SWEEP, "--output", str(tmp_path), "--methods", "sparsegpt", "hassle", "--rates", "0.7"]
    result = run_quality([*args, "--seed", "0", "1", "2", "--table-only", "--plot", str(plot)])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| hassle | 0.7 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    logs = [math.log(n / b) for n, b in zip(hassle, sparsegpt, strict=True)]
    mean = sum(logs) / 3
    half = student_t.ppf(0.975, 2) * math.sqrt(sum((x - mean) ** 2 for x in logs) / 2) / math.sqrt(3)
    assert cells[4] == "3"
    assert cells[5] == " ".join(f"{n / b:.3f}" for n, b in zip(hassle, sparsegpt, strict=True))
    assert cells[6] == f"{math.exp(mean):.3f}"
    assert cells[7] == f"[{math.exp(mean - half):.3f}, {math.exp(mean + half):.3f}]"
    assert plot.stat().st_size > 10_000 and not list(tmp_path.glob("*.tmp.png"))


def test_default_shrinkage_reads_the_runs_of_the_value_it_resolves_to(tmp_path):
    """Unset `--hessian-shrinkage` is the library default: at ρ = 0.3 it is λ = 0.5, so the stored λ = 0.5 run is
    that cell; at 0.6 it is the full Hessian, stored without a suffix."""
    (tmp_path / "dense.json").write_text(json.dumps({"perplexity": 20.0, "seconds": 0.0}))
    store(tmp_path, "hassle-uniform-0.3-fast-k0.1-h2-lam0.5", 24.5)
    store(tmp_path, "hassle-uniform-0.6-fast-k0.1-h2", 80.0)
    args = [*SWEEP, "--output", str(tmp_path), "--methods", "hassle", "--rates", "0.3", "0.6", "--table-only"]
    result = run_quality(args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| 24.50 |" in result.stdout and "| 80.00 |" in result.stdout and "not run yet" not in result.stdout


def test_table_only_with_skip_dense_is_refused_not_silent(tmp_path):
    """`--skip-dense` means "a worker run, no table"; with `--table-only` the run would print nothing and exit 0."""
    args = [*SWEEP, "--output", str(tmp_path), "--methods", "sparsegpt", "--table-only", "--skip-dense"]
    result = run_quality(args)
    assert result.returncode == 2
    assert "drop --skip-dense" in result.stderr


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu0", "is not a torch device"), pytest.param("cuda", "no CUDA device", marks=NO_CUDA)],
)
def test_a_device_that_cannot_run_is_refused_before_any_work(tmp_path, device, message):
    """A typo or a missing GPU must stop the sweep at once with the fix, not after the model is loaded."""
    result = run_quality([*SWEEP, "--output", str(tmp_path), "--methods", "sparsegpt", "--device", device])
    assert result.returncode == 2
    assert message in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("device", "message"),
    [("gpu0", "is not a torch device"), pytest.param("cuda", "no CUDA device", marks=NO_CUDA)],
)
def test_the_layer_benchmark_refuses_a_device_with_the_same_message(device, message):
    """benchmarks/hessian_slr.py shares the sweep's --device check: refused before the model and Hessians load."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "hessian_slr.py"), "--device", device],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert message in result.stderr
