"""Compress on load, compact checkpoints, reload, dequantize, bad files and the Hub, on tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import optimum_oats
from optimum_oats import LinearSparseLowRank, OATSConfig
from optimum_oats.integrations.checkpoint import CheckpointError
from optimum_oats.integrations.transformers import register

IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])


@pytest.fixture(scope="module")
def oats_cfg(calibration_texts) -> OATSConfig:
    return OATSConfig(dataset=calibration_texts[:200], num_samples=2, seqlen=32, num_iterations=4)


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, dense_dir, oats_cfg) -> Path:
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=oats_cfg)
    path = tmp_path_factory.mktemp("compressed")
    model.save_pretrained(path)
    torch.save(model(IDS).logits, path / "expected_logits.pt")
    return path


def _compressed(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LinearSparseLowRank)]


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    register()
    register()
    import importlib

    importlib.reload(optimum_oats)
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["oats"].__name__ == "OATSConfig"
    assert AUTO_QUANTIZER_MAPPING["oats"].__name__ == "OATSHfQuantizer"


@pytest.mark.parametrize("spelling", ["quantization_config", "oats_config"])
@pytest.mark.parametrize("cls", [AutoModelForCausalLM, LlamaForCausalLM])
def test_compress_on_load(dense_dir, oats_cfg, spelling, cls):
    model = cls.from_pretrained(dense_dir, **{spelling: oats_cfg})
    assert len(_compressed(model)) == 14
    assert isinstance(model.config.quantization_config, OATSConfig)
    assert len(model.config.quantization_config.layer_map) == 14
    assert isinstance(model.lm_head, nn.Linear)
    assert oats_cfg.layer_map is None and isinstance(oats_cfg.dataset, list)  # the caller's config is untouched


def test_both_spellings_at_once_is_refused(dense_dir, oats_cfg):
    with pytest.raises(ValueError, match="either `oats_config` or `quantization_config`"):
        AutoModelForCausalLM.from_pretrained(dense_dir, oats_config=oats_cfg, quantization_config=oats_cfg)


def test_checkpoint_layout_and_report(compressed_dir):
    files = sorted(p.name for p in compressed_dir.iterdir())
    assert {"config.json", "model.safetensors", "oats_report.json"} <= set(files)
    assert not [f for f in files if f.startswith(".")]
    config = json.loads((compressed_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "oats"
    assert "tokenizer" not in config["quantization_config"]
    with safe_open(compressed_dir / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.layers.0.mlp.up_proj.weight_mask").dtype == torch.uint8
    assert "model.layers.0.mlp.up_proj.lowrank_u" in keys and "model.layers.0.mlp.up_proj.weight" in keys
    report = json.loads((compressed_dir / "oats_report.json").read_text())
    assert report["summary"]["compressed_layers"] == 14


def test_reload_gives_identical_logits_without_calibration(compressed_dir, monkeypatch):
    compress_module = sys.modules["optimum_oats.engine.loop"]
    monkeypatch.setattr(compress_module, "calibration_inputs", lambda *a, **k: pytest.fail("calibrated"))
    model = AutoModelForCausalLM.from_pretrained(compressed_dir)
    assert len(_compressed(model)) == 14
    assert torch.equal(model(IDS).logits, torch.load(compressed_dir / "expected_logits.pt"))


def test_reload_bf16(compressed_dir, tmp_path):
    fp32 = AutoModelForCausalLM.from_pretrained(compressed_dir)
    bf16 = AutoModelForCausalLM.from_pretrained(compressed_dir, dtype=torch.bfloat16)
    layer = bf16.model.layers[0].mlp.up_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.weight_mask.dtype == torch.uint8
    reference = fp32.model.layers[0].mlp.up_proj
    for name, tensor in layer.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name].to(tensor.dtype)), name
    # transformers keeps some buffers (rotary) in float32 when loading in bf16, so compare loosely to a cast...
    torch.testing.assert_close(bf16(IDS).logits.float(), fp32(IDS).logits, rtol=0.05, atol=0.05)
    # ...and exactly to the bf16 model saved and reloaded.
    bf16.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(again(IDS).logits, bf16(IDS).logits)


@pytest.mark.parametrize("kwargs", [{"device_map": "auto"}, {"low_cpu_mem_usage": True}])
def test_reload_with_loading_options(compressed_dir, kwargs):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir, **kwargs)
    assert torch.equal(model(IDS).logits, torch.load(compressed_dir / "expected_logits.pt"))


@pytest.mark.slow
def test_reload_in_fresh_process(compressed_dir):
    script = (
        "import torch, optimum_oats\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(compressed_dir)!r})\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        f"assert torch.equal(m(ids).logits, torch.load({str(compressed_dir / 'expected_logits.pt')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def _layer_bytes(path: Path, dtype: torch.dtype) -> tuple[int, int]:
    """Bytes of compressed linear tensors on disk vs the same layers stored dense in `dtype`."""
    config = json.loads((path / "config.json").read_text())
    layer_map = config["quantization_config"]["layer_map"]
    compressed = dense = 0
    with safe_open(path / "model.safetensors", "pt") as handle:
        for name in layer_map:
            for suffix in ("weight", "weight_mask", "lowrank_u", "lowrank_v"):
                tensor = handle.get_tensor(f"{name}.{suffix}")
                compressed += tensor.numel() * tensor.element_size()
            out_features, packed = handle.get_slice(f"{name}.weight_mask").get_shape()
            in_features = handle.get_slice(f"{name}.lowrank_v").get_shape()[1]
            dense += out_features * in_features * torch.tensor([], dtype=dtype).element_size()
    return compressed, dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_bytes_at_half_compression(compressed_dir, tmp_path, dtype):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir, dtype=dtype)
    model.save_pretrained(tmp_path)
    compressed, dense = _layer_bytes(tmp_path, dtype)
    assert compressed <= 0.6 * dense, f"{compressed / dense:.3f}"


def test_sharded_save_and_reload(compressed_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir)
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again(IDS).logits, torch.load(compressed_dir / "expected_logits.pt"))


def test_dequantize_gives_plain_checkpoint(compressed_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir)
    expected = model(IDS).logits
    model = model.dequantize()
    assert not _compressed(model)
    assert getattr(model.config, "quantization_config", None) is None
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert not (tmp_path / "oats_report.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(plain.model.layers[0].mlp.up_proj, nn.Linear)
    torch.testing.assert_close(plain(IDS).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_trust_remote_code_loads_without_importing_the_plugin(compressed_dir):
    config = json.loads((compressed_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "modeling_oats.OATSLlamaConfig",
        "AutoModelForCausalLM": "modeling_oats.OATSLlamaForCausalLM",
    }
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(compressed_dir)!r}, trust_remote_code=True)\n"
        "assert 'optimum_oats' in sys.modules\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        f"assert torch.equal(m(ids).logits, torch.load({str(compressed_dir / 'expected_logits.pt')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


@pytest.mark.slow
def test_load_without_plugin_fails_loudly(compressed_dir):
    script = (
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(compressed_dir)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "mismatch" in result.stderr.lower() or "ignore_mismatched_sizes" in result.stderr


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(exist_ok=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_truncated_checkpoint_names_the_file(compressed_dir, tmp_path):
    broken = _copy_checkpoint(compressed_dir, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_corrupted_header_names_the_file(compressed_dir, tmp_path):
    broken = _copy_checkpoint(compressed_dir, tmp_path / "broken")
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_config_disagreeing_with_tensors_names_the_tensor(compressed_dir, tmp_path):
    broken = _copy_checkpoint(compressed_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["layer_map"]["model.layers.1.mlp.down_proj"]["rank"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"`model\.layers\.1\.mlp\.down_proj\.lowrank_u`.*disagree"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_failed_save_leaves_nothing_behind(compressed_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir)

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", failing_save)
    target = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(target)
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_push_to_hub_uploads_compact_checkpoint(hub, compressed_dir):
    model = AutoModelForCausalLM.from_pretrained(compressed_dir)
    model.push_to_hub("user/tiny-oats")
    files = hub.repo("user/tiny-oats").files()
    assert {"config.json", "model.safetensors", "oats_report.json"} <= set(files)
    again = AutoModelForCausalLM.from_pretrained("user/tiny-oats")
    assert torch.equal(again(IDS).logits, torch.load(compressed_dir / "expected_logits.pt"))


def _mapped(path: Path) -> bool:
    """Whether this process still maps the file (Linux: /proc/self/maps)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see memory maps")
def test_loading_in_another_dtype_releases_the_file_mapping(compressed_dir):
    """fp32 checkpoint loaded as bf16: the values are converted copies, so nothing may keep the file mapped (the
    uint8 masks did, and with them every fp32 page read during conversion: more resident memory than the model)."""
    import gc

    model = AutoModelForCausalLM.from_pretrained(compressed_dir, dtype=torch.bfloat16)
    gc.collect()
    file = compressed_dir / "model.safetensors"
    assert not _mapped(file)
    layer = model.get_submodule(_compressed(model)[0])
    assert layer.weight.dtype == torch.bfloat16 and layer.weight_mask._base is None
    expected = torch.load(compressed_dir / "expected_logits.pt")
    assert torch.allclose(model(IDS).logits.float(), expected, atol=0.2, rtol=0.05)
    same = AutoModelForCausalLM.from_pretrained(compressed_dir, dtype=torch.float32)
    assert _mapped(file)  # no conversion: the values are the mapping, and stay lazily paged
    assert torch.allclose(same(IDS).logits, expected, atol=1e-5)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see memory maps")
def test_quantized_layers_loaded_in_another_dtype_release_the_file_mapping(tmp_path, dense_dir, calibration_texts):
    """4-bit values have no float tensor on disk: their codes and scales were views of the file, which kept every
    fp32 page read during the conversion of the embeddings resident (+~170 MB on SmolLM2-135M in bf16)."""
    import gc

    cfg = OATSConfig(
        dataset=calibration_texts[:200],
        num_samples=2,
        seqlen=32,
        method_settings={"num_iterations": 2},
        value_bits=4,
        group_size=32,
    )
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=cfg)
    model.save_pretrained(tmp_path)
    expected = model(IDS).logits
    del model
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    gc.collect()
    assert not _mapped(tmp_path / "model.safetensors")
    layer = again.get_submodule(_compressed(again)[0])
    assert layer.value_spec is not None and layer.weight_codes._base is None and layer.weight_scales._base is None
    assert torch.allclose(again(IDS).logits.float(), expected, atol=0.2, rtol=0.05)
