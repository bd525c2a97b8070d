import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_oats import LinearSparseLowRank, OATSConfig, compress
from optimum_oats.integrations.peft import (
    export_lora,
    from_peft_model,
    load_lora,
    lora_config_for,
    sparse_base_model,
    to_peft_model,
)

IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])


@pytest.fixture(scope="module")
def oats_model(tiny_configs, tokenizer, calibration_texts):
    from tests.helpers.tiny_models import build_tiny_model

    model = build_tiny_model(tiny_configs["llama"])
    # One layer kept dense and one rank-0 layer are the edge cases of the adapter layout.
    config = OATSConfig(
        dataset=calibration_texts[:200],
        num_samples=2,
        seqlen=32,
        num_iterations=4,
        modules_to_not_convert=["layers.0.self_attn.k_proj"],
    )
    return compress(model, config, tokenizer, progress=False)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_lora_config_has_per_layer_ranks_and_unit_scaling(oats_model):
    config = lora_config_for(oats_model)
    layers = {n: m for n, m in oats_model.named_modules() if isinstance(m, LinearSparseLowRank)}
    assert set(config.target_modules) == set(layers)
    assert "model.layers.0.self_attn.k_proj" not in config.target_modules
    for name, layer in layers.items():
        key = name.replace(".", r"\.")
        assert config.rank_pattern.get(key, config.r) == layer.rank
        assert config.alpha_pattern.get(key, config.lora_alpha) == layer.rank
    assert len({layer.rank for layer in layers.values()}) > 1  # the pattern is really exercised


def test_exported_adapter_reproduces_logits_and_merges(oats_model, tmp_path):
    expected = _logits(oats_model)
    base_dir, adapter_dir = export_lora(oats_model, tmp_path)

    base_config = json.loads((base_dir / "config.json").read_text())
    assert "quantization_config" not in base_config
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    layer = oats_model.get_submodule("model.layers.1.mlp.down_proj")
    assert torch.equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"], layer.lowrank_u)
    assert torch.equal(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"], layer.lowrank_v)

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    sparse = base.get_submodule("model.layers.1.mlp.down_proj").weight
    assert torch.equal(sparse != 0, layer.dense_mask())  # the base holds S with its zero pattern
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-5, atol=1e-5)

    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, LinearSparseLowRank) for m in merged.modules())
    torch.testing.assert_close(
        merged.get_submodule("model.layers.1.mlp.down_proj").weight, layer.to_dense(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-5, atol=1e-5)


def test_import_round_trip_is_compact_and_reloads(oats_model, tmp_path):
    expected = _logits(oats_model)
    base_dir, adapter_dir = export_lora(oats_model, tmp_path / "lora")
    model = load_lora(base_dir, adapter_dir)

    for name, layer in oats_model.named_modules():
        if isinstance(layer, LinearSparseLowRank):
            imported = model.get_submodule(name)
            assert isinstance(imported, LinearSparseLowRank)
            assert torch.equal(imported.weight_mask, layer.weight_mask)
            assert (imported.rank, imported.sparse_nnz) == (layer.rank, layer.sparse_nnz)
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), nn.Linear)
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path / "compact")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    assert isinstance(reloaded.config.quantization_config, OATSConfig)
    assert 0.45 < 1 - reloaded.config.quantization_config.compression_rate < 0.55
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_in_memory_peft_model_matches_and_input_is_untouched(oats_model):
    expected = _logits(oats_model)
    peft_model = to_peft_model(oats_model)
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-5, atol=1e-5)
    assert any(isinstance(m, LinearSparseLowRank) for m in oats_model.modules())
    back = from_peft_model(peft_model)
    torch.testing.assert_close(_logits(back), expected, rtol=1e-5, atol=1e-5)


def test_errors_name_the_problem(tiny_llama):
    with pytest.raises(ValueError, match="no compressed layer"):
        lora_config_for(tiny_llama)
    with pytest.raises(ValueError, match="compress it first"):
        sparse_base_model(tiny_llama)
