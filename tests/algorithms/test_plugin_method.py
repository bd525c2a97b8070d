"""Adding a method takes one file (tests/helpers/toy_method.py: its math and settings) and one registry line: the
toy then runs through `compress()` and `oats compress`, its settings reaching its `run` from both."""

from __future__ import annotations

import json

import pytest
import torch

from optimum_oats import LinearSparseLowRank, OATSConfig, compress
from optimum_oats.algorithms import register_algorithm, unregister_algorithm
from tests.commands.test_cli import FAST_COMPRESS, last_json, run_cli
from tests.helpers.tiny_models import build_tiny_model
from tests.helpers.toy_method import TOY, ToySettings


@pytest.fixture
def toy():
    register_algorithm(TOY)  # the one registry line
    yield TOY
    unregister_algorithm(TOY.name)


def _sparse_weights(model) -> dict[str, torch.Tensor]:
    return {name: m.sparse_weight() for name, m in model.named_modules() if isinstance(m, LinearSparseLowRank)}


def _compressed(config, tiny_configs, tokenizer, texts):
    return compress(build_tiny_model(tiny_configs["llama"]), config, tokenizer, dataset=texts, progress=False)


def test_a_registered_method_runs_through_compress_with_its_settings(toy, tiny_configs, tokenizer, calibration_texts):
    calibration = dict(num_samples=2, seqlen=32)
    as_wanda = OATSConfig(method="toy", method_settings=ToySettings(norm_power=1.0), **calibration)
    toy_model = _compressed(as_wanda, tiny_configs, tokenizer, calibration_texts[:50])
    wanda_model = _compressed(
        OATSConfig(method="wanda", **calibration), tiny_configs, tokenizer, calibration_texts[:50]
    )
    toy_weights, wanda_weights = _sparse_weights(toy_model), _sparse_weights(wanda_model)
    assert len(toy_weights) == 14 and toy_weights.keys() == wanda_weights.keys()
    for name in toy_weights:  # with p = 1 the toy score is Wanda's
        torch.testing.assert_close(toy_weights[name], wanda_weights[name], rtol=0, atol=0)
    magnitude_like = _compressed(
        OATSConfig(method="toy", method_settings={"norm_power": 0.0}, **calibration),
        tiny_configs,
        tokenizer,
        calibration_texts[:50],
    )
    assert any(not torch.equal(w, toy_weights[n]) for n, w in _sparse_weights(magnitude_like).items())
    assert toy_model.config.quantization_config.method_settings == ToySettings(norm_power=1.0)


def test_a_registered_method_runs_through_the_cli_with_its_flags(toy, dense_dir, calibration_texts, tmp_path):
    calibration_file = tmp_path / "calibration.txt"
    calibration_file.write_text("\n\n".join(calibration_texts[:50]), encoding="utf-8")
    output = tmp_path / "toy"
    argv = ["compress", str(dense_dir), "-o", str(output), "--dataset", str(calibration_file)]
    code, lines = run_cli([*argv, "--method", "toy", "--norm-power", "0.25", "--num-samples", "2", "--seqlen", "32"])
    assert code == 0, lines
    summary = last_json(lines)
    assert summary["ok"] is True and summary["method"] == "toy" and summary["compressed_layers"] == 14
    saved = json.loads((output / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "toy" and saved["method_settings"] == {"norm_power": 0.25}


def test_a_flag_of_another_method_is_refused(toy, dense_dir, tmp_path):
    code, lines = run_cli(["compress", str(dense_dir), "-o", str(tmp_path / "x"), "--norm-power", "1", *FAST_COMPRESS])
    assert code == 1
    assert "`--norm-power` is a setting of --method toy, not of --method oats" in last_json(lines)["error"]


def test_names_are_not_registered_twice(toy):
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_algorithm(TOY)
