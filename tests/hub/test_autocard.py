"""`save_pretrained` and plain `push_to_hub` of a compressed model write this package's model card, with the Hub's
`model-index` when results are known, and never replace a card the user already has."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import HfApi, ModelCard

from optimum_oats import OATSConfig, compress
from optimum_oats.hub.autocard import EVAL_ATTR
from tests.helpers.tiny_models import build_tiny_model

RESULTS = {
    "compressed": {"wikitext2": {"token_perplexity": 31.5, "seqlen": 128}, "boolq": {"acc": 0.61, "n_samples": 200}},
    "dense": {"wikitext2": {"token_perplexity": 25.0, "seqlen": 128}, "boolq": {"acc": 0.63, "n_samples": 200}},
}


@pytest.fixture
def compressed(tiny_configs, tokenizer, calibration_texts):
    model = build_tiny_model(tiny_configs["llama"])
    config = OATSConfig(dataset=calibration_texts[:200], num_samples=2, seqlen=32, num_iterations=4)
    return compress(model, config, tokenizer, progress=False)


def _metrics(card: ModelCard) -> dict[str, float]:
    return {f"{r.dataset_type}/{r.metric_type}": r.metric_value for r in card.data.eval_results or []}


def test_save_pretrained_writes_the_oats_card(compressed, tmp_path):
    compressed.save_pretrained(tmp_path / "plain")
    card = ModelCard.load(tmp_path / "plain" / "README.md")
    assert "oats" in card.data.tags and "optimum-oats" in card.text and not card.data.eval_results
    setattr(compressed, EVAL_ATTR, RESULTS)
    compressed.save_pretrained(tmp_path / "scored")
    card = ModelCard.load(tmp_path / "scored" / "README.md")
    assert _metrics(card)["super_glue/acc"] == pytest.approx(0.61)
    assert json.loads((tmp_path / "scored" / "eval_results.json").read_text())["dense"]["boolq"]["acc"] == 0.63


def test_a_users_card_is_kept(compressed, tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\nmy own words\n")
    compressed.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "---\nlicense: mit\n---\nmy own words\n"


def test_results_saved_beside_the_checkpoint_reach_the_card(compressed, tmp_path):
    from transformers import AutoModelForCausalLM

    compressed.save_pretrained(tmp_path)
    (tmp_path / "README.md").unlink()
    (tmp_path / "eval_results.json").write_text(json.dumps({"base_model": None, **RESULTS}))  # as `oats evaluate`
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded.save_pretrained(tmp_path)
    assert _metrics(ModelCard.load(tmp_path / "README.md"))["wikitext/token_perplexity"] == pytest.approx(31.5)


def test_plain_push_to_hub_commits_the_oats_card_with_results(hub, compressed):
    setattr(compressed, EVAL_ATTR, RESULTS)
    compressed.push_to_hub("user/auto-card")
    assert "README.md" in hub.repo("user/auto-card").files()
    card = ModelCard.load("user/auto-card")
    assert "optimum-oats" in card.text and "More Information Needed" not in card.text
    assert _metrics(card)["super_glue/acc"] == pytest.approx(0.61)
    assert card.data.model_name == "auto-card"


def test_push_to_hub_keeps_the_repositorys_own_card(hub, compressed):
    api = HfApi()
    api.create_repo("user/has-card")
    api.upload_file(
        path_or_fileobj=b"---\nlicense: mit\n---\nhand written\n", path_in_repo="README.md", repo_id="user/has-card"
    )
    compressed.push_to_hub("user/has-card")
    card = ModelCard.load("user/has-card")
    assert "hand written" in card.text and "optimum-oats" not in card.text
