"""`embedding_bits=8`: the token embedding and its tied LM head as int8 rows; exact reload, bytes, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from optimum_oats import OATSConfig, compress
from optimum_oats.integrations.checkpoint import CheckpointError
from optimum_oats.nn.quantized_embedding import INT8_GEMM_MAX_ROWS, QuantizedEmbedding, TiedQuantizedHead
from tests.helpers.tiny_models import _tiny_configs, build_tiny_model

IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])


def _config(texts, **overrides) -> OATSConfig:
    settings = dict(
        method="wanda", compression_rate=0.4, dataset=texts[:100], num_samples=2, seqlen=32, embedding_bits=8
    )
    return OATSConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def tied_dense_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama whose LM head is tied to its embedding (as SmolLM2's)."""
    config = _tiny_configs()["llama"]
    config.tie_word_embeddings = True
    model = build_tiny_model(config)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    path = tmp_path_factory.mktemp("tied-dense")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory, tied_dense_dir, calibration_texts) -> Path:
    config = _config(calibration_texts, method="hassle", value_bits=4, lowrank_bits=8, group_size=32)
    model = AutoModelForCausalLM.from_pretrained(tied_dense_dir, quantization_config=config)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert isinstance(model.get_output_embeddings(), TiedQuantizedHead)
    path = tmp_path_factory.mktemp("int8-embedding")
    model.save_pretrained(path)
    torch.save(model(IDS).logits, path / "expected_logits.pt")
    return path


def test_reload_is_bit_exact_and_generates(int8_dir):
    model = AutoModelForCausalLM.from_pretrained(int8_dir)
    head = model.get_output_embeddings()
    assert isinstance(head, TiedQuantizedHead) and head.embedding is model.get_input_embeddings()
    assert torch.equal(model(IDS).logits, torch.load(int8_dir / "expected_logits.pt"))
    out = model.generate(IDS, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)


def test_file_stores_the_table_once_as_int8_rows(int8_dir, tied_dense_dir):
    with safe_open(int8_dir / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
        codes = handle.get_tensor("model.embed_tokens.weight_codes")
        scales = handle.get_tensor("model.embed_tokens.weight_scales")
    assert "model.embed_tokens.weight" not in keys and not any(key.startswith("lm_head") for key in keys)
    with safe_open(tied_dense_dir / "model.safetensors", "pt") as handle:
        dense = handle.get_tensor("model.embed_tokens.weight")
    assert codes.dtype == torch.int8 and codes.shape == dense.shape
    assert scales.dtype == torch.int16 and scales.shape == (dense.shape[0],)  # fp16 bit patterns, one per row
    # Each row decodes to within half a step of the dense row (round to nearest, scale from the clip search).
    step = scales.view(torch.float16).float().unsqueeze(1)
    assert ((codes.float() * step - dense.float()).abs() <= step * 0.5 + 1e-6).float().mean() > 0.99
    config = json.loads((int8_dir / "config.json").read_text())
    assert config["quantization_config"]["embedding_bits"] == 8
    assert config["tie_word_embeddings"] is False  # the tie is held by the head, not by transformers


def test_head_reads_codes_as_the_decoded_table_would():
    torch.manual_seed(0)
    table = nn.Embedding(300, 48)
    from optimum_oats.algorithms.quantize import quantize_rows_int8

    codes, scales = quantize_rows_int8(table.weight.detach())
    embedding = QuantizedEmbedding.from_codes(codes, scales, torch.float32)
    head = TiedQuantizedHead(embedding)
    decoded = embedding.dequantized()
    assert torch.equal(embedding(torch.tensor([[3, 299, 0]])), decoded[[3, 299, 0]].unsqueeze(0))
    for rows in (1, INT8_GEMM_MAX_ROWS, INT8_GEMM_MAX_ROWS + 1):  # int8 GEMM, then decode + float GEMM
        x = torch.randn(rows, 48)
        torch.testing.assert_close(head(x), x @ decoded.T, rtol=1e-4, atol=1e-4)
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    embedding.to(torch.bfloat16)
    torch.testing.assert_close(head(x).float(), x.float() @ decoded.T, rtol=2e-2, atol=2e-2)


def test_dequantize_restores_a_tied_float_embedding(int8_dir):
    model = AutoModelForCausalLM.from_pretrained(int8_dir)
    expected = model(IDS).logits
    model.dequantize()
    embedding = model.get_input_embeddings()
    assert type(embedding) is nn.Embedding and model.lm_head.weight is embedding.weight
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-3, atol=1e-3)


def test_missing_embedding_codes_are_named(int8_dir, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in int8_dir.iterdir():
        if file.is_file():
            (damaged / file.name).write_bytes(file.read_bytes())
    with safe_open(int8_dir / "model.safetensors", "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(int8_dir / "model.safetensors")
    del tensors["model.embed_tokens.weight_codes"]
    save_file(tensors, damaged / "model.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight_codes.*embedding_bits"):
        AutoModelForCausalLM.from_pretrained(damaged)


def test_untied_head_is_refused_before_calibration(calibration_texts):
    model = build_tiny_model(_tiny_configs()["llama"])  # tie_word_embeddings=False
    with pytest.raises(ValueError, match="untied head. Leave `embedding_bits=16`"):
        compress(model, _config(calibration_texts), progress=False)


@pytest.mark.parametrize("bits", [4, 6, 12])
def test_only_int8_is_offered(bits):
    with pytest.raises(ValueError, match=r"`embedding_bits` must be one of \(8, 16\)"):
        OATSConfig(embedding_bits=bits)


def test_report_and_card_state_the_int8_embedding(int8_dir):
    from optimum_oats import compression_report

    model = AutoModelForCausalLM.from_pretrained(int8_dir)
    text = str(compression_report(model))
    assert "int8 rows" in text and "stored bits per weight of the compressed layers" in text
    assert "token embedding and tied LM head as int8 rows" in (int8_dir / "README.md").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to see memory maps")
def test_loading_in_another_dtype_releases_the_file_mapping(int8_dir):
    """fp32 file loaded in bf16: the int8 codes must not stay views of the file (they kept every fp32 page read
    during the conversion resident: +85 MB on SmolLM2-135M, more than the codes saved)."""
    import gc

    model = AutoModelForCausalLM.from_pretrained(int8_dir, dtype=torch.bfloat16)
    gc.collect()
    assert str((int8_dir / "model.safetensors").resolve()) not in Path("/proc/self/maps").read_text()
    embedding = model.get_input_embeddings()
    assert embedding.weight_codes._base is None and embedding.weight_scales._base is None
    expected = torch.load(int8_dir / "expected_logits.pt")
    assert torch.allclose(model(IDS).logits.float(), expected, atol=0.2, rtol=0.05)


def test_an_embedding_with_its_own_forward_is_refused(calibration_texts):
    """Gemma 3 scales its lookup inside its embedding class: a plain int8 table would drop the scale."""
    model = build_tiny_model(_tiny_configs()["gemma3"])
    embedding = type(model.get_input_embeddings())
    assert embedding is not nn.Embedding and issubclass(embedding, nn.Embedding)
    with pytest.raises(ValueError, match=f"has {embedding.__name__}. Leave `embedding_bits=16`"):
        compress(model, _config(calibration_texts), progress=False)
