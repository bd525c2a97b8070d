import copy

import pytest
import torch
from torch import nn

from optimum_oats import CompressionReport, LinearSparseLowRank, OATSConfig, compress, compression_report
from optimum_oats.data.text import CalibrationDataError
from tests.helpers.tiny_models import ARCHITECTURES, _tiny_configs, build_tiny_model


def _cfg(**kwargs):
    base = dict(num_samples=2, seqlen=32, num_iterations=4)
    base.update(kwargs)
    return OATSConfig(**base)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_block_linear_is_replaced_within_budget(arch, tiny_configs, tokenizer, calibration_texts):
    model = build_tiny_model(tiny_configs[arch])
    block_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    embeddings_before = model.get_input_embeddings().weight.clone()
    ids = torch.randint(0, 1000, (1, 12))
    compress(model, _cfg(dataset=calibration_texts), tokenizer, progress=False)

    replaced = {n for n, m in model.named_modules() if isinstance(m, LinearSparseLowRank)}
    assert replaced == block_linears
    assert isinstance(model.get_output_embeddings(), nn.Linear)
    assert torch.equal(model.get_input_embeddings().weight, embeddings_before)
    for name in replaced:
        layer = model.get_submodule(name)
        target = 0.5 * layer.in_features * layer.out_features
        assert layer.num_parameters <= target
        assert target - layer.num_parameters < layer.out_features
    assert model.config.quantization_config.layer_map.keys() == replaced
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("method", ["oats", "hassle", "wanda", "sparsegpt", "magnitude"])
def test_methods_report(method, tiny_llama, tokenizer, calibration_texts):
    compress(tiny_llama, _cfg(method=method, dataset=calibration_texts), tokenizer, progress=False)
    report = compression_report(tiny_llama)
    assert isinstance(report, CompressionReport)
    assert len(report.layers) == 14
    assert abs(report.kept_fraction - 0.5) < 0.01
    assert all(0 <= layer.relative_error < 1 for layer in report.layers)
    ranks = {layer.rank for layer in report.layers}
    assert (ranks == {0}) == (method not in ("oats", "hassle"))
    summary = report.to_dict()["summary"]
    assert summary["compressed_layers"] == 14


def test_compress_leaves_caller_config_untouched(tiny_llama, tokenizer, calibration_texts):
    cfg = _cfg(dataset=calibration_texts)
    compress(tiny_llama, cfg, tokenizer, progress=False)
    assert cfg.layer_map is None
    assert tiny_llama.config.quantization_config is not cfg


def test_modules_to_not_convert_matches_exactly(tiny_configs, tokenizer, calibration_texts):
    config = copy.deepcopy(tiny_configs["llama"])
    config.num_hidden_layers = 11
    model = build_tiny_model(config)
    compress(
        model,
        _cfg(dataset=calibration_texts, modules_to_not_convert=["layers.1.mlp.down_proj"]),
        tokenizer,
        progress=False,
    )
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    assert isinstance(model.model.layers[10].mlp.down_proj, LinearSparseLowRank)


def test_compressing_twice_is_refused(tiny_llama, tokenizer, calibration_texts):
    compress(tiny_llama, _cfg(dataset=calibration_texts), tokenizer, progress=False)
    with pytest.raises(ValueError, match="already quantized or compressed"):
        compress(tiny_llama, _cfg(dataset=calibration_texts), tokenizer, progress=False)


def test_nm_pattern_end_to_end(tiny_llama, tokenizer, calibration_texts):
    compress(tiny_llama, _cfg(dataset=calibration_texts, sparsity_pattern="2:8"), tokenizer, progress=False)
    layer = tiny_llama.model.layers[0].mlp.up_proj
    assert (layer.dense_mask().view(layer.out_features, -1, 8).sum(-1) <= 2).all()
    assert layer.rank > 0


def test_deterministic(tiny_configs, tokenizer, calibration_texts):
    states = []
    for _ in range(2):
        model = build_tiny_model(tiny_configs["llama"])
        compress(model, _cfg(dataset=calibration_texts), tokenizer, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_self_generated_calibration(tokenizer):
    """The model writes its own calibration text: its vocabulary must be the tokenizer's, or its samples of the ids
    the tokenizer lacks decode to nothing."""
    model = build_tiny_model(_tiny_configs(len(tokenizer))["llama"])
    compress(model, _cfg(dataset="self", num_samples=1, seqlen=16), tokenizer, progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, LinearSparseLowRank)


@pytest.mark.parametrize(
    "dataset, message",
    [
        (["   ", ""], "holds no text"),
        (["tiny"], "fewer than one window"),
        ("/nonexistent/file.jsonl", "neither a local file"),
    ],
)
def test_bad_calibration_data(dataset, message, tiny_llama, tokenizer):
    with pytest.raises(CalibrationDataError, match=message):
        compress(tiny_llama, OATSConfig(dataset=dataset, seqlen=64, num_samples=2), tokenizer, progress=False)


def test_named_dataset_offline_without_data_dir(tiny_llama, tokenizer, monkeypatch, tmp_path):
    monkeypatch.delenv("OATS_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CalibrationDataError, match="OATS_DATA_DIR"):
        compress(tiny_llama, OATSConfig(dataset="c4", seqlen=16, num_samples=1), tokenizer, progress=False)


def test_named_dataset_from_data_dir(tiny_llama, tokenizer, monkeypatch, data_dir):
    monkeypatch.setenv("OATS_DATA_DIR", str(data_dir))
    compress(tiny_llama, _cfg(dataset="c4"), tokenizer, progress=False)
    assert isinstance(tiny_llama.model.layers[1].self_attn.o_proj, LinearSparseLowRank)


def test_missing_tokenizer_is_explained(tiny_llama):
    with pytest.raises(ValueError, match="tokenizer"):
        compress(tiny_llama, _cfg(dataset=["some text"]), progress=False)


@pytest.mark.parametrize("method", ["oats", "wanda", "sparsegpt", "magnitude"])
def test_owl_rates_vary_per_block_and_average_to_target(method, tiny_configs, tokenizer, calibration_texts):
    config = copy.deepcopy(tiny_configs["llama"])
    config.num_hidden_layers = 4
    model = build_tiny_model(config)
    cfg = _cfg(
        dataset=calibration_texts,
        method=method,
        layerwise="owl",
        owl_lambda=0.1,
        owl_threshold=3.0,
        compression_rate=0.6,
    )
    compress(model, cfg, tokenizer, progress=False)
    numbers = {layer.name: layer for layer in compression_report(model).layers}  # per-layer numbers: the report
    rates = [numbers[f"model.layers.{i}.mlp.up_proj"].compression_rate for i in range(4)]
    ratios = [numbers[f"model.layers.{i}.mlp.up_proj"].owl_outlier_ratio for i in range(4)]
    assert abs(sum(rates) / 4 - 0.6) < 1e-5
    assert abs(max(rates) - min(rates) - 0.2) < 1e-5
    assert sorted(range(4), key=rates.__getitem__) == sorted(range(4), key=lambda i: -ratios[i])
    for i, rate in enumerate(rates):
        layer = model.model.layers[i].mlp.up_proj
        target = (1 - rate) * layer.in_features * layer.out_features
        assert target - layer.out_features < layer.num_parameters <= target
    report = compression_report(model)
    assert {round(layer.compression_rate, 6) for layer in report.layers} == {round(r, 6) for r in rates}


def test_owl_with_nm_is_refused():
    with pytest.raises(ValueError, match="layerwise='owl'"):
        OATSConfig(layerwise="owl", sparsity_pattern="2:4")
