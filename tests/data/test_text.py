"""Calibration windows: the three samplings, and BOS at the start of every window where the tokenizer adds one."""

from __future__ import annotations

import pytest
import torch

from optimum_oats import OATSConfig
from optimum_oats.data.text import CalibrationDataError, leading_special_tokens, sample_calibration_windows
from tests.helpers.word_tokenizer import WordTokenizer

DOCS = [" ".join(f"d{d}w{i}" for i in range(n)) for d, n in enumerate([5, 40, 7, 60, 12, 33, 80, 9, 25, 50])]


def _doc_of(tokenizer, token_id: int) -> int:
    word = next(w for w, i in tokenizer.vocab.items() if i == token_id)
    return int(word[1 : word.index("w")])


def test_leading_special_tokens():
    assert leading_special_tokens(WordTokenizer(add_bos=True)) == [1]
    assert leading_special_tokens(WordTokenizer(add_bos=False)) == []


@pytest.mark.slow
def test_smollm2_tokenizer_adds_no_bos(smollm2_tokenizer):
    """So the default windows of the recorded SmolLM2 benchmarks are unchanged by the BOS handling."""
    assert leading_special_tokens(smollm2_tokenizer) == []


@pytest.mark.parametrize("add_bos", [True, False])
def test_joined_windows_start_with_bos_only_where_the_tokenizer_adds_one(add_bos):
    tok = WordTokenizer(add_bos=add_bos)
    windows = sample_calibration_windows(tok, DOCS, num_samples=4, seqlen=16, seed=3)
    assert windows.shape == (4, 16)
    assert (windows[:, 0] == tok.bos_token_id).all() == add_bos
    body = windows[:, 1:] if add_bos else windows
    assert not (body == tok.bos_token_id).any()
    # The bodies are consecutive pieces of one EOS-joined stream.
    stream = body.flatten().tolist()
    assert stream.count(tok.eos_token_id) >= 1


def test_document_windows_start_at_a_document_start_with_bos():
    tok = WordTokenizer()
    windows = sample_calibration_windows(tok, DOCS, num_samples=3, seqlen=20, seed=0, sampling="documents")
    assert windows.shape[1] == 20 and 1 <= windows.shape[0] <= 3
    first_docs = []
    for row in windows.tolist():
        assert row[0] == tok.bos_token_id
        doc = _doc_of(tok, row[1])
        assert row[1] == tok.vocab[f"d{doc}w0"]  # the sample's text begins where a document begins
        first_docs.append(doc)
    assert len(set(first_docs)) == len(first_docs)  # used documents are not drawn again


def test_random_windows_lie_inside_one_long_document():
    tok = WordTokenizer()
    windows = sample_calibration_windows(tok, DOCS, num_samples=5, seqlen=30, seed=1, sampling="random_windows")
    assert windows.shape == (5, 30)
    for row in windows.tolist():
        words = [w for w, i in tok.vocab.items() if i in row]
        docs = {int(w[1 : w.index("w")]) for w in words}
        assert len(docs) == 1 and len(DOCS[docs.pop()].split()) + 1 > 30
        names = {i: w for w, i in tok.vocab.items()}
        positions = [int(names[t].split("w")[1]) for t in row if t != tok.bos_token_id]
        assert positions == list(range(positions[0], positions[0] + len(positions)))  # contiguous


def test_random_windows_refuse_when_no_document_is_long_enough():
    with pytest.raises(CalibrationDataError, match="No document longer than `seqlen=500`"):
        sample_calibration_windows(WordTokenizer(), DOCS, num_samples=1, seqlen=500, sampling="random_windows")


@pytest.mark.parametrize("sampling", ["joined", "documents", "random_windows"])
def test_samplings_are_seeded(sampling):
    tok = WordTokenizer()
    tok(" ".join(DOCS))  # fix every word's id before sampling
    a = sample_calibration_windows(tok, DOCS, 3, 12, seed=5, sampling=sampling)
    b = sample_calibration_windows(tok, DOCS, 3, 12, seed=5, sampling=sampling)
    others = [sample_calibration_windows(tok, DOCS, 3, 12, seed=s, sampling=sampling) for s in range(6, 10)]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, other) for other in others)


def test_unknown_sampling_is_refused():
    with pytest.raises(ValueError, match="`calibration_sampling` must be one of"):
        OATSConfig(calibration_sampling="middle")
    with pytest.raises(ValueError, match="`calibration_sampling` must be one of"):
        sample_calibration_windows(WordTokenizer(), DOCS, 1, 8, sampling="middle")


def test_perplexity_windows_start_with_bos_where_the_tokenizer_adds_one():
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_oats.evaluation.perplexity import token_perplexity

    text = " ".join(DOCS)
    for add_bos in (True, False):
        tok = WordTokenizer(add_bos=add_bos)
        tok(text)
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
            )
        )
        seen: list[torch.Tensor] = []

        def record(module, args, output, seen=seen):
            seen.append(args[0].clone())

        model.model.embed_tokens.register_forward_hook(record)
        value = token_perplexity(model, tok, text, seqlen=16, progress=False)
        windows = torch.cat(seen)
        assert (windows[:, 0] == tok.bos_token_id).all() == add_bos and value > 1
        assert windows.shape[1] == 16
