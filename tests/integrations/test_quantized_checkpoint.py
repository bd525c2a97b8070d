"""Quantized checkpoints (packed codes + fp16 scales): bit-exact reload, true bytes, bits per weight, bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from optimum_oats import LinearSparseLowRank, OATSConfig, compression_report
from optimum_oats.integrations.checkpoint import CheckpointError
from optimum_oats.utils.counting import storage_bits

IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])


@pytest.fixture(scope="module", params=[("hassle", 4, 8), ("oats", 3, 4)], ids=["hassle-w4-uv8", "oats-w3-uv4"])
def quantized_dir(request, tmp_path_factory, dense_dir, calibration_texts) -> Path:
    method, value_bits, lowrank_bits = request.param
    config = OATSConfig(
        method=method,
        compression_rate=0.4,
        dataset=calibration_texts[:200],
        num_samples=2,
        seqlen=32,
        num_iterations=4,
        hessian_iterations=1,
        value_bits=value_bits,
        lowrank_bits=lowrank_bits,
        group_size=32,
    )
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)
    path = tmp_path_factory.mktemp(f"quantized-{method}")
    model.save_pretrained(path)
    torch.save(model(IDS).logits, path / "expected_logits.pt")
    (path / "expected_bits.json").write_text(json.dumps(compression_report(model).bits_per_weight))
    return path


def _layers(model) -> dict[str, LinearSparseLowRank]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearSparseLowRank)}


def test_reload_is_bit_exact(quantized_dir):
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    assert len(_layers(model)) == 14
    assert torch.equal(model(IDS).logits, torch.load(quantized_dir / "expected_logits.pt"))


@pytest.mark.slow
def test_reload_in_fresh_process_is_bit_exact(quantized_dir):
    script = (
        "import torch, optimum_oats\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(quantized_dir)!r})\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        f"assert torch.equal(m(ids).logits, torch.load({str(quantized_dir / 'expected_logits.pt')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


def test_file_holds_packed_codes_and_fp16_scales_only(quantized_dir):
    config = json.loads((quantized_dir / "config.json").read_text())["quantization_config"]
    value_bits, lowrank_bits = config["value_bits"], config["lowrank_bits"]
    with safe_open(quantized_dir / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
        for name, entry in config["layer_map"].items():
            assert (entry["value_bits"], entry["lowrank_bits"], entry["group_size"]) == (value_bits, lowrank_bits, 32)
            assert f"{name}.weight" not in keys and f"{name}.lowrank_u" not in keys  # no float copy on disk
            codes = handle.get_tensor(f"{name}.weight_codes")
            assert codes.dtype == torch.uint8 and codes.numel() == -(-entry["nnz"] * value_bits // 8)
            scales = handle.get_tensor(f"{name}.weight_scales")
            out_features, in_features = (
                handle.get_tensor(f"{name}.weight_mask").shape[0],
                64 if "down" not in name else 128,
            )
            assert scales.dtype == torch.int16 and scales.shape == (out_features, in_features // 32)
            assert torch.isfinite(scales.view(torch.float16)).all() and (scales.view(torch.float16) > 0).all()
            u_codes = handle.get_tensor(f"{name}.lowrank_u_codes")
            assert u_codes.numel() == -(-out_features * entry["rank"] * lowrank_bits // 8)


def test_bits_per_weight_counts_every_stored_byte(quantized_dir):
    """The report's bits per weight = the file's bytes of the compressed layers (bias excluded) over their weights,
    and the analytic formula (`storage_bits`) gives the same count layer by layer."""
    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    report = compression_report(model)
    stored = dense = 0
    with safe_open(quantized_dir / "model.safetensors", "pt") as handle:
        for name, layer in _layers(model).items():
            layer_bits = 0
            for key in handle.keys():
                if key.startswith(name + ".") and key != f"{name}.bias":
                    tensor = handle.get_tensor(key)
                    layer_bits += tensor.numel() * tensor.element_size() * 8
            config = model.config.quantization_config
            assert (
                layer_bits
                == layer.stored_bits
                == storage_bits(
                    layer.sparse_nnz,
                    layer.rank,
                    layer.in_features,
                    layer.out_features,
                    value_bits=config.value_bits,
                    lowrank_bits=config.lowrank_bits,
                    group_size=config.group_size,
                )
            )
            stored += layer_bits
            dense += layer.in_features * layer.out_features
    assert report.bits_per_weight == pytest.approx(stored / dense, rel=1e-12)
    assert report.bits_per_weight == json.loads((quantized_dir / "expected_bits.json").read_text())
    assert report.to_dict()["summary"]["bits_per_weight"] < 6  # fp32 values alone would be ~19 bits at rho 0.4


def test_bf16_reload_leaves_scales_alone(quantized_dir):
    fp32 = AutoModelForCausalLM.from_pretrained(quantized_dir)
    bf16 = AutoModelForCausalLM.from_pretrained(quantized_dir, dtype=torch.bfloat16)
    for name, layer in _layers(bf16).items():
        reference = _layers(fp32)[name]
        assert layer.weight.dtype == torch.bfloat16 and layer.weight_scales.dtype == torch.int16
        assert torch.equal(layer.weight_scales, reference.weight_scales)
        assert torch.equal(layer.weight, reference.weight.to(torch.bfloat16))
        assert torch.equal(layer.lowrank_v, reference.lowrank_v.to(torch.bfloat16))


def test_layer_map_disagreeing_with_the_codes_is_refused(quantized_dir, tmp_path):
    for file in quantized_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    first = next(iter(config["quantization_config"]["layer_map"]))
    config["quantization_config"]["layer_map"][first]["value_bits"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"`{first}.weight_codes`.*shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_card_and_report_state_the_bits(quantized_dir):
    from optimum_oats.hub.card import render_model_card

    model = AutoModelForCausalLM.from_pretrained(quantized_dir)
    report = compression_report(model)
    config = model.config.quantization_config
    text = str(render_model_card(report))
    row = "| Bits per weight (values, mask, scales and factors of the compressed layers) |"
    assert f"{row} {report.bits_per_weight:.3f} |" in text
    assert f"{config.value_bits}-bit values, 1-bit mask, {config.lowrank_bits}-bit U, V" in text
    assert "one fp16 scale per 32 input columns" in text


def test_verify_accepts_a_quantized_checkpoint(quantized_dir):
    from optimum_oats.integrations.verify import verify_checkpoint

    summary = verify_checkpoint(quantized_dir)
    assert not summary["damaged"], summary["problems"]
    assert summary["layers_checked"] == 14
