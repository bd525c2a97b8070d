"""benchmarks/toolkit: resumable cells, provenance, data folder, calibration statistics and intervals.

These are unit tests of the shared module on tiny inputs; the scripts that use it have their own tests beside this.
"""

from __future__ import annotations

import json
import math
import os
import sys
from statistics import fmean, stdev

import pytest
import torch
from scipy.stats import t as student_t
from toolkit.calibration import c4_token_windows, layer_statistics
from toolkit.cells import read_cell, resume_cell, write_cell
from toolkit.data import data_root
from toolkit.intervals import geometric_interval
from toolkit.models import SMOLLM2_DIMS, block_layer_names, llama_block_shapes
from toolkit.provenance import Provenance

from optimum_oats.algorithms import HESSIAN, INPUT_NORMS


class Counter:
    """A cell's computation that counts how often it runs."""

    def __init__(self, record: dict | None) -> None:
        self.record, self.calls = record, 0

    def __call__(self) -> dict | None:
        self.calls += 1
        return self.record


def test_resume_computes_once_and_then_reads_the_stored_cell(tmp_path):
    file = tmp_path / "oats-0.5.json"
    compute = Counter({"perplexity": 24.5, "seconds": 3.0})
    assert resume_cell(file, compute) == {"perplexity": 24.5, "seconds": 3.0}
    stamp = file.stat().st_mtime_ns
    again = Counter({"perplexity": 99.0})
    assert resume_cell(file, again) == {"perplexity": 24.5, "seconds": 3.0}
    assert again.calls == 0 and compute.calls == 1 and file.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oats-0.5.json"]  # no temporary file left behind


@pytest.mark.parametrize("stored", ['{"perplexity": 24.', "", "[1, 2]", '"done"'])
def test_a_half_written_or_foreign_file_is_not_a_finished_cell(tmp_path, stored):
    file = tmp_path / "cell.json"
    file.write_text(stored)
    assert read_cell(file) is None
    compute = Counter({"perplexity": 24.5})
    assert resume_cell(file, compute) == {"perplexity": 24.5}
    assert compute.calls == 1 and json.loads(file.read_text()) == {"perplexity": 24.5}


def test_a_cell_that_cannot_run_now_stores_nothing(tmp_path):
    file = tmp_path / "cell.json"
    assert resume_cell(file, Counter(None)) is None
    assert not file.exists()


def test_write_cell_replaces_the_file_whole(tmp_path):
    file = tmp_path / "cell.json"
    write_cell(file, {"a": 1})
    write_cell(file, {"b": [1.5, None]})
    assert read_cell(file) == {"b": [1.5, None]} and [p.name for p in tmp_path.iterdir()] == ["cell.json"]


def test_provenance_has_the_fields_and_measures_the_load_at_both_ends(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/quality.py", "--rates", "0.5", "a b"])
    provenance = Provenance.start("scipy")
    record = provenance.record()
    assert set(record) == {
        "started",
        "finished",
        "host",
        "cpu",
        "threads",
        "load_before",
        "load_after",
        "python",
        "versions",
        "code",
        "command",
    }
    assert record["started"] <= record["finished"] and record["started"].endswith("+00:00")
    assert len(record["load_before"]) == 3 and len(record["load_after"]) == 3
    assert record["versions"]["torch"] == torch.__version__
    assert set(record["versions"]) == {"torch", "transformers", "optimum-oats", "scipy"}
    assert record["command"] == "python benchmarks/quality.py --rates 0.5 'a b'"
    assert record["threads"] == torch.get_num_threads()
    assert record["code"] is None or len(record["code"].removesuffix("+dirty")) >= 7
    line = provenance.line()
    assert line.startswith("provenance: ") and "load " in line and record["command"] in line
    assert "\n" not in line
    json.dumps(record)  # storable as it is


def test_data_root_reads_the_environment_and_exports_it(tmp_path, monkeypatch):
    monkeypatch.setenv("OATS_DATA_DIR", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.setenv("OATS_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="does not exist"):
        data_root()
    monkeypatch.setenv("OATS_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("OATS_DATA_DIR")
    monkeypatch.setattr("toolkit.data.BESIDE_CHECKOUT", tmp_path)
    assert data_root(export=True) == tmp_path and os.environ["OATS_DATA_DIR"] == str(tmp_path)
    monkeypatch.delenv("OATS_DATA_DIR")
    monkeypatch.setattr("toolkit.data.BESIDE_CHECKOUT", tmp_path / "missing")
    with pytest.raises(SystemExit, match="Set OATS_DATA_DIR"):
        data_root()


def test_c4_windows_are_consecutive_tokens_of_the_first_documents(tmp_path, tokenizer):
    documents = [f"document {i} says something about the weather and the sea." for i in range(200)]
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4_sample.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    windows = c4_token_windows(tokenizer, 3, 16, tmp_path)
    joined = tokenizer("\n\n".join(documents), return_tensors="pt").input_ids[0]
    assert windows.shape == (3, 16) and torch.equal(windows.flatten(), joined[:48])
    with pytest.raises(SystemExit, match="fewer than"):
        c4_token_windows(tokenizer, 1000, 1024, tmp_path)


def test_layer_statistics_are_the_inputs_of_each_named_layer(tiny_llama):
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    windows = torch.randint(0, tiny_llama.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(0))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(tiny_llama.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda _m, args, _o, name=name: seen[name].append(args[0].detach()))
        for name in names
    ]
    norms = layer_statistics(tiny_llama, names, windows, INPUT_NORMS)
    for handle in handles:
        handle.remove()
    hessians = layer_statistics(tiny_llama, names, windows, HESSIAN)
    for name in names:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name][:3]]).double()
        torch.testing.assert_close(norms[name].double(), x.square().sum(0).sqrt(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hessians[name].double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_geometric_interval_is_the_t_interval_on_the_log_scale():
    values = [0.8, 0.9, 0.85]
    logs = [math.log(v) for v in values]
    half = student_t.ppf(0.975, 2) * stdev(logs) / math.sqrt(3)
    mean, (low, high) = geometric_interval(values)
    assert mean == pytest.approx(math.exp(fmean(logs)), rel=1e-12)
    assert (low, high) == pytest.approx((math.exp(fmean(logs) - half), math.exp(fmean(logs) + half)), rel=1e-12)
    assert geometric_interval([2.0]) == (pytest.approx(2.0), None)


def test_smollm2_shapes_and_layer_names():
    assert llama_block_shapes(SMOLLM2_DIMS) == {
        "q/o": (576, 576),
        "k/v": (192, 576),
        "gate/up": (1536, 576),
        "down": (576, 1536),
    }
    assert block_layer_names([2, 15], ["q_proj", "down_proj"]) == [
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.15.self_attn.q_proj",
        "model.layers.15.mlp.down_proj",
    ]
