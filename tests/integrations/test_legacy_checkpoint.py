"""A checkpoint written before the redesign (commit b3d9cb0: per-layer numbers inside config.json's `layer_map`)
still loads, computes the same logits, and is rewritten in the current layout when saved again."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import optimum_oats  # noqa: F401  (registers the "oats" method)
from optimum_oats import compression_report

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
LEGACY = FIXTURES / "legacy_b3d9cb0_llama"


def _legacy_layer_map() -> dict:
    return json.loads((LEGACY / "config.json").read_text())["quantization_config"]["layer_map"]


def test_fixture_is_in_the_old_layout():
    entry = _legacy_layer_map()["model.layers.0.mlp.up_proj"]
    assert {"rank", "nnz", "relative_error", "owl_outlier_ratio", "compression_rate"} <= set(entry)


def test_old_checkpoint_loads_with_the_same_logits():
    expected = torch.load(FIXTURES / "legacy_b3d9cb0_llama_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(LEGACY)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-5)


def test_old_numbers_move_from_the_layer_map_to_the_report(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(LEGACY)
    layer_map = model.config.quantization_config.layer_map
    assert all(set(entry) == {"rank", "nnz"} for entry in layer_map.values())
    legacy = _legacy_layer_map()
    report = {layer.name: layer for layer in compression_report(model).layers}
    for name, entry in legacy.items():
        assert report[name].relative_error == entry["relative_error"]
        assert report[name].owl_outlier_ratio == entry["owl_outlier_ratio"]
        assert report[name].compression_rate == entry["compression_rate"]
        assert (report[name].rank, report[name].nnz) == (entry["rank"], entry["nnz"])

    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]["layer_map"]
    assert saved == {name: {"rank": e["rank"], "nnz": e["nnz"]} for name, e in legacy.items()}
    layers = json.loads((tmp_path / "resaved" / "oats_report.json").read_text())["layers"]
    assert {layer["name"]: layer["relative_error"] for layer in layers} == {
        name: e["relative_error"] for name, e in legacy.items()
    }
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")
    assert compression_report(reloaded).to_dict() == compression_report(model).to_dict()


FLAT = FIXTURES / "flat_settings_d6939ad_llama"


def test_checkpoint_with_flat_method_settings_loads_with_the_same_logits():
    """Saved by d6939ad (`tests/fixtures/make_flat_settings_d6939ad.py`): hassle's and OATS's settings are flat
    keys of config.json's `quantization_config`."""
    expected = torch.load(FIXTURES / "flat_settings_d6939ad_llama_logits.pt")
    saved = json.loads((FLAT / "config.json").read_text())["quantization_config"]
    assert (saved["num_iterations"], saved["svd"], saved["hessian_iterations"]) == (5, "exact", 1)
    model = AutoModelForCausalLM.from_pretrained(FLAT)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-4, atol=1e-5)


def test_flat_method_settings_are_mapped_and_resaved_in_the_new_layout(tmp_path):
    from optimum_oats.algorithms import HassleSettings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a checkpoint is not the user's code: no deprecation noise
        model = AutoModelForCausalLM.from_pretrained(FLAT)
    config = model.config.quantization_config
    assert config.method == "hassle"
    assert config.method_settings == HassleSettings(
        num_iterations=5, solver="exact", hessian_iterations=1, hessian_shrinkage=0.25
    )
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert saved["method_settings"] == {
        "num_iterations": 5,
        "solver": "exact",
        "hessian_iterations": 1,
        "hessian_shrinkage": 0.25,
    }
    assert not {"num_iterations", "svd", "hessian_iterations", "hessian_shrinkage"} & set(saved)
