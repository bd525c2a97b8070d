"""benchmarks/losparse_glue.py end to end on a tiny random BERT and a few SST-2 sentences.

What is checked: every kind of cell runs through Trainer, writes its JSON with the fields the table reads, the
compressed cells are saved, reloaded with `AutoModelForSequenceClassification` and predict as in memory,
the kept fractions land on the asked budget, the structured control keeps its zero rows through fine-tuning, and
a second run reads the stored cells instead of training again.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_encoders import build_wordpiece_tokenizer, text_configs

pytestmark = pytest.mark.slow  # reads benchmarks/ scripts (tests/test_markers.py)
REPO_ROOT = Path(__file__).resolve().parents[2]
CELLS = ["dense", "losparse-0.2", "structured-0.2", "oats-0.2", "hassle-0.2"]
FIELDS = {"cell", "seed", "steps", "kept_fraction", "test_accuracy", "reload_agreement", "checkpoint_bytes"}
FIELDS |= {"train_seconds", "train_cpu_seconds", "loadavg_before_after", "machine", "protocol", "date", "losses"}


@pytest.fixture(scope="module")
def glue():
    return importlib.import_module("losparse_glue")  # benchmarks/ is on sys.path (tests/benchmarks/conftest.py)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, data_dir):
    from toolkit.glue import read_sst2
    from transformers import BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = build_wordpiece_tokenizer([r["sentence"] for r in read_sst2(data_dir, "dev")])
    config = text_configs(len(tokenizer))["bert"]
    config.num_labels = 2
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(glue, model, output, extra=()):
    glue.main(
        ["--model", str(model), "--output", str(output), "--train-size", "48", "--test-size", "24", "--seeds", "0"]
        + ["--batch-size", "8", "--delta-t", "1", "--calibration", "8", "--oats-iterations", "2", "--cells", *CELLS]
        + list(extra)
    )


def test_every_cell_runs_saves_reloads_and_resumes(glue, tiny_model, tmp_path, monkeypatch, capsys, data_dir):
    monkeypatch.setenv("OATS_DATA_DIR", str(data_dir))
    run(glue, tiny_model, tmp_path)
    records = {cell: json.loads((tmp_path / f"{cell}-seed0.json").read_text()) for cell in CELLS}
    for cell, record in records.items():
        assert FIELDS <= set(record), (cell, FIELDS - set(record))
        assert record["steps"] == 6 and record["protocol"]["train"] == 48 and record["protocol"]["test"] == 24
        # scored on the reloaded checkpoint, which must behave as the model in memory
        assert record["reload_agreement"] == 1.0, cell
        assert record["checkpoint_bytes"] > 0 and record["machine"]["torch_threads"] == 1
    assert records["dense"]["kept_fraction"] == 1.0
    for cell in ("losparse-0.2", "oats-0.2", "hassle-0.2", "structured-0.2"):
        assert 0.17 < records[cell]["kept_fraction"] < 0.23, (cell, records[cell]["kept_fraction"])
    # compact formats are smaller than dense; the structured control is stored dense
    assert records["losparse-0.2"]["checkpoint_bytes"] < records["dense"]["checkpoint_bytes"]
    assert records["oats-0.2"]["checkpoint_bytes"] < records["dense"]["checkpoint_bytes"]
    assert records["structured-0.2"]["checkpoint_bytes"] == records["dense"]["checkpoint_bytes"]
    table = capsys.readouterr().out
    assert "| losparse-0.2 | 1 | 0.2" in table and "| paper drop |" in table

    # a rerun trains nothing: the stored cells come back unchanged
    stamps = {cell: (tmp_path / f"{cell}-seed0.json").stat().st_mtime_ns for cell in CELLS}
    plot = tmp_path / "plot.png"
    run(glue, tiny_model, tmp_path, ["--table-only", "--plot", str(plot)])
    assert stamps == {cell: (tmp_path / f"{cell}-seed0.json").stat().st_mtime_ns for cell in CELLS}
    assert plot.stat().st_size > 5_000


def test_structured_control_keeps_its_rows_zero_through_training(glue, tiny_model):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model)
    layers = glue.encoder_linears(model)
    before = {name: layer.weight.detach().norm(dim=1).clone() for name, layer in layers.items()}
    masks = glue.magnitude_row_masks(model, 0.25)
    callback = glue.RowMaskCallback(model, masks)
    assert set(masks) == set(layers) and len(layers) == 12  # 2 blocks x 6 linears
    for name, mask in masks.items():
        assert int(mask.sum()) == -(-mask.numel() // 4)
        assert before[name][~mask].max() <= before[name][mask].min()  # the largest rows are the kept ones
        norms = layers[name].weight.norm(dim=1)
        assert norms[~mask].max() == 0 and torch.equal(norms[mask], before[name][mask])
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.add_(1.0)  # what an optimizer step does to the zero rows
    callback.on_optimizer_step(None, None, None)
    for name, mask in masks.items():
        assert layers[name].weight[~mask].abs().max() == 0


def test_a_bad_cell_name_is_refused_before_training(glue):
    with pytest.raises(SystemExit, match="Unknown cell 'lowrank-0.2'"):
        glue.parse_args(["--cells", "dense", "lowrank-0.2"])
    with pytest.raises(SystemExit, match="0 < kept < 1"):
        glue.parse_args(["--cells", "losparse-1.5"])
