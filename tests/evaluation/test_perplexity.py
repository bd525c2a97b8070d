"""Paper-style WikiText-2 token perplexity (`optimum_oats.evaluation.perplexity`)."""

from __future__ import annotations

import math

import pytest
import torch

from optimum_oats.evaluation import token_perplexity, wikitext2_rows, wikitext2_text


def test_wikitext2_rows_follow_the_hub_layout(data_dir):
    rows = wikitext2_rows(data_dir, "test")
    assert len(rows) == 4358
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert rows[3].startswith(" Robert Boulter is an English film , television and theatre actor .")
    # non-empty rows keep their newline; whitespace-only lines become ""
    assert all(row == "" or (row.endswith("\n") and row.strip()) for row in rows)
    assert len(wikitext2_rows(data_dir, "validation")) == 3760
    assert wikitext2_rows(data_dir, "valid") == wikitext2_rows(data_dir, "validation")


def test_wikitext2_text_is_the_paper_string(data_dir):
    text = wikitext2_text(data_dir)
    assert text == "\n\n".join(wikitext2_rows(data_dir))
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    assert len(text) == 1294336


def test_wikitext2_reads_oats_data_dir(data_dir, monkeypatch):
    monkeypatch.setenv("OATS_DATA_DIR", str(data_dir))
    assert wikitext2_text(split="validation") == wikitext2_text(data_dir, split="validation")


def test_wikitext2_without_data_names_the_env_var(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.delenv("OATS_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="OATS_DATA_DIR"):
        wikitext2_text()


def test_wikitext2_bad_folder_or_split(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wikitext2_text(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        wikitext2_text(tmp_path)
    with pytest.raises(FileNotFoundError, match="train split"):
        wikitext2_text(data_dir, split="train")
    with pytest.raises(ValueError, match="split"):
        wikitext2_text(data_dir, split="dev")


def test_token_perplexity_is_exp_of_mean_window_loss(tiny_lm, tokenizer, data_dir):
    text = wikitext2_text(data_dir)[:20_000]
    seqlen, n = 128, 3
    ids = tokenizer(text, return_tensors="pt").input_ids[0, : n * seqlen].view(n, seqlen)
    with torch.no_grad():
        losses = [tiny_lm(ids[i : i + 1], labels=ids[i : i + 1]).loss.item() for i in range(n)]
    expected = math.exp(sum(losses) / n)

    ppl = token_perplexity(tiny_lm, tokenizer, text, seqlen=seqlen, max_windows=n, progress=False)
    batched = token_perplexity(tiny_lm, tokenizer, text, seqlen=seqlen, max_windows=n, batch_size=2)
    assert ppl == pytest.approx(expected, rel=1e-5)
    assert batched == pytest.approx(ppl, rel=1e-5)
    # a random model is close to uniform over the vocabulary
    assert 0.5 * len(tokenizer) < ppl < 2 * len(tokenizer)


def test_token_perplexity_restores_training_mode_and_checks_inputs(tiny_lm, tokenizer):
    tiny_lm.train()
    try:
        token_perplexity(tiny_lm, tokenizer, "hello world " * 40, seqlen=16, progress=False)
        assert tiny_lm.training
    finally:
        tiny_lm.eval()
    with pytest.raises(ValueError, match="fewer than one window"):
        token_perplexity(tiny_lm, tokenizer, "too short", seqlen=64, progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        token_perplexity(tiny_lm, tokenizer, "hello world " * 40, seqlen=16, max_windows=0)


@pytest.mark.slow
def test_smollm2_wikitext2_perplexity(smollm2, smollm2_tokenizer, data_dir):
    ppl = token_perplexity(smollm2, smollm2_tokenizer, wikitext2_text(data_dir), seqlen=512, max_windows=4)
    assert math.isfinite(ppl)
    # SmolLM2-135M-Instruct scores about 31 here; a broken model or text gives thousands, a leak gives ~1
    assert 5 < ppl < 100
