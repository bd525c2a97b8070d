"""Model card rendering (pure) and one-commit publishing against the loopback Hub."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult, HfApi, ModelCard
from transformers import AutoModelForCausalLM

from optimum_oats import CompressionReport, OATSConfig
from optimum_oats.hub.card import (
    DEFAULT_MODEL_HUB_ID,
    TAGS,
    model_card_template,
    render_model_card,
    resolve_base_model,
)
from optimum_oats.hub.plots import plot_layer_report
from optimum_oats.hub.publish import PublishError, publish, publish_folder
from tests.helpers.hub_server import DEFAULT_TOKEN
from tests.helpers.tiny_models import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMPRESSED = {
    "wikitext2": {"token_perplexity": 31.5, "seqlen": 32, "max_windows": 2},
    "boolq": {"acc": 0.6, "acc_stderr": 0.1, "n_samples": 10},
    "arc_easy": {"acc": 0.4, "acc_norm": 0.45, "n_samples": 10},
    "zero_shot_mean": 0.5,
}
DENSE = {
    "wikitext2": {"token_perplexity": 25.0, "seqlen": 32},
    "boolq": {"acc": 0.65, "n_samples": 10},
    "arc_easy": {"acc": 0.5, "acc_norm": 0.55, "n_samples": 10},
    "zero_shot_mean": 0.6,
}


@pytest.fixture(scope="module")
def compressed_model(tiny_configs, tokenizer, calibration_texts):
    from optimum_oats import compress

    model = build_tiny_model(tiny_configs["llama"])
    config = OATSConfig(dataset=calibration_texts[:200], num_samples=2, seqlen=32, num_iterations=4)
    return compress(model, config, tokenizer, progress=False)


@pytest.fixture(scope="module")
def report(compressed_model) -> CompressionReport:
    return CompressionReport.from_model(compressed_model)


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, compressed_model, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("compressed")
    compressed_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _card(report, **kwargs) -> ModelCard:
    kwargs.setdefault("base_model", BASE)
    return render_model_card(report, **kwargs)


def _layer_rows(card: ModelCard) -> list[str]:
    return [line for line in str(card).splitlines() if re.match(r"^\| model\.layers\.\d+\.", line)]


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------------------------- rendering
def test_card_metadata_parses_back(report):
    card = _card(report, eval_results=COMPRESSED, dense_results=DENSE, plot_path="oats_layers.png", repo_id="u/m")
    data = ModelCard(str(card)).data
    assert data.base_model == BASE
    assert data.base_model_relation == "quantized"
    assert set(TAGS) <= set(data.tags)
    assert data.license == "apache-2.0"  # known for the default base model
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.model_name == "m"


def test_license_argument_then_unknown_base_defaults_to_other(report):
    assert ModelCard(str(_card(report, base_model="someone/model"))).data.license == "other"
    assert ModelCard(str(_card(report, base_model="someone/model", license="mit"))).data.license == "mit"


def test_model_index_holds_the_compressed_numbers(report):
    card = _card(report, eval_results=COMPRESSED, dense_results=DENSE)
    results = ModelCard(str(card)).data.eval_results
    assert all(isinstance(r, EvalResult) for r in results)
    found = {(r.task_name, r.metric_type): r.metric_value for r in results}
    # stderr, n_samples, seqlen, max_windows and the zero-shot mean are not model-index metrics
    assert found == {
        ("wikitext2", "token_perplexity"): 31.5,
        ("boolq", "acc"): 0.6,
        ("arc_easy", "acc"): 0.4,
        ("arc_easy", "acc_norm"): 0.45,
    }
    boolq = next(r for r in results if r.task_name == "boolq")
    assert (boolq.dataset_type, boolq.dataset_config, boolq.dataset_split) == ("super_glue", "boolq", "validation")


def test_markdown_table_puts_dense_next_to_compressed(report):
    text = str(_card(report, eval_results=COMPRESSED, dense_results=DENSE))
    assert "| boolq | acc | 0.65 | 0.6 | -0.05 | 10 |" in text
    assert "| wikitext2 | token_perplexity | 25 | 31.5 | +6.5 |  |" in text
    assert "| **Zero-shot mean** | acc_norm / acc | 0.6 | 0.5 | -0.1 | |" in text
    only_ours = str(_card(report, eval_results=COMPRESSED))
    assert "| boolq | acc | – | 0.6 | – | 10 |" in only_ours


def test_layer_table_has_one_row_per_compressed_layer(report):
    card = _card(report)
    rows = _layer_rows(card)
    assert len(rows) == len(report.layers) == 14
    first = report.layers[0]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:4] == [first.name, f"{first.out_features} × {first.in_features}", str(first.rank), f"{first.nnz:,}"]


def test_report_dict_renders_like_the_report(report):
    assert str(_card(report.to_dict())) == str(_card(report))


def test_card_has_load_snippet_config_and_plot(report):
    text = str(_card(report, repo_id="user/tiny-oats", plot_path="oats_layers.png"))
    snippet = text[text.index("## How to load") :]
    assert snippet.index("import optimum_oats") < snippet.index(
        'AutoModelForCausalLM.from_pretrained("user/tiny-oats")'
    )
    assert "![Per-layer rank, sparse density and relative error](oats_layers.png)" in text
    config = json.loads(re.search(r"```json\n(.*?)\n```", text, re.DOTALL).group(1))
    assert config["method"] == "oats" and config["compression_rate"] == 0.5
    # compress() records a summary of in-memory calibration texts, not megabytes of text:
    assert re.fullmatch(r"<\d+ texts given in memory, sha256 [0-9a-f]{16}>", config["dataset"])
    assert "No evaluation results were provided." in text
    assert "model-index" not in text


def test_rendering_is_pure(report, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("network access while rendering"))
    _card(report, eval_results=COMPRESSED, dense_results=DENSE, plot_path="oats_layers.png")
    assert list(tmp_path.iterdir()) == []


def test_repo_template_is_the_packaged_template():
    assert (REPO_ROOT / "model_cards" / "oats_model_card.md").read_text(encoding="utf-8") == model_card_template()


def test_plot_layer_report_writes_a_png(report, tmp_path):
    for source, name in ((report, "a.png"), (report.to_dict(), "b.png")):
        path = plot_layer_report(source, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_resolve_base_model(smollm2_path, tmp_path):
    assert resolve_base_model("default") == DEFAULT_MODEL_HUB_ID
    assert resolve_base_model(smollm2_path) == DEFAULT_MODEL_HUB_ID
    assert resolve_base_model("someone/model") == "someone/model"
    assert resolve_base_model(str(tmp_path)) is None and resolve_base_model(None) is None


# ----------------------------------------------------------------------------------------------- publishing
def test_publish_pushes_everything_in_one_commit(hub, compressed_model, tokenizer):
    url = publish(
        compressed_model,
        "user/tiny-oats",
        tokenizer=tokenizer,
        eval_results=COMPRESSED,
        dense_results=DENSE,
        base_model=BASE,
    )
    repo = hub.repo("user/tiny-oats")
    assert len(repo.log()) == 2  # the repo's initial commit + ours
    assert url.endswith(repo.head())
    files = repo.files()
    expected = {"config.json", "model.safetensors", "oats_report.json", "README.md", "oats_layers.png"}
    assert expected | {"eval_results.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert json.loads(files["eval_results.json"]) == {"base_model": BASE, "compressed": COMPRESSED, "dense": DENSE}
    card = ModelCard(files["README.md"].decode())
    assert len(_layer_rows(card)) == 14
    assert HfApi().model_info("user/tiny-oats").card_data.base_model_relation == "quantized"

    again = AutoModelForCausalLM.from_pretrained("user/tiny-oats")
    assert torch.equal(again(IDS).logits, compressed_model(IDS).logits)


def test_publish_folder_private_and_leaves_folder_untouched(hub, compressed_dir):
    before = _snapshot(compressed_dir)
    publish_folder(compressed_dir, "user/private-oats", base_model=BASE, private=True)
    assert hub.repo("user/private-oats").private
    assert set(before) | {"README.md", "oats_layers.png"} == set(hub.repo("user/private-oats").files()) - {
        ".gitattributes"
    }
    assert _snapshot(compressed_dir) == before


def test_republish_drops_stale_shards(hub, compressed_dir, tmp_path):
    bigger = tmp_path / "bigger"
    shutil.copytree(compressed_dir, bigger)
    (bigger / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    publish_folder(bigger, "user/again", base_model=BASE)
    publish_folder(compressed_dir, "user/again", base_model=BASE)
    repo = hub.repo("user/again")
    assert len(repo.log()) == 3
    assert "model-00002-of-00002.safetensors" not in repo.files()
    assert {"model.safetensors", "README.md"} <= set(repo.files())


def test_failed_commit_raises_clear_error_and_keeps_local_files(hub, compressed_dir, tmp_path, monkeypatch):
    staging_root = tmp_path / "tmp"
    staging_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging_root))  # to see that staging is cleaned up
    before = _snapshot(compressed_dir)
    hub.fail_next("/commit/", 500)
    with pytest.raises(PublishError) as excinfo:
        publish_folder(compressed_dir, "user/fails", base_model=BASE)
    message = str(excinfo.value)
    assert "'user/fails'" in message and "HTTP 500" in message and "uploading the files" in message
    assert "Nothing was committed" in message and "'user/fails' created for this push was deleted" in message
    assert "user/fails" not in hub.repos  # no empty repository is left behind
    assert _snapshot(compressed_dir) == before
    assert list(staging_root.iterdir()) == []


def test_failed_push_to_an_existing_repository_keeps_it(hub, compressed_dir):
    publish_folder(compressed_dir, "user/kept", base_model=BASE)
    commits = len(hub.repo("user/kept").log())
    hub.fail_next("/commit/", 500)
    with pytest.raises(PublishError, match="HTTP 500") as excinfo:  # a new card, so there is something to commit
        publish_folder(compressed_dir, "user/kept", base_model=BASE, license="mit")
    assert "deleted" not in str(excinfo.value) and len(hub.repo("user/kept").log()) == commits


def test_failed_lfs_upload_says_what_the_hub_answered(hub, compressed_dir, monkeypatch):
    """huggingface_hub retries the LFS upload, then wraps the Hub's HTTP 500 in a RuntimeError: that is an answer
    from the Hub, not "could not reach the Hub"."""
    import huggingface_hub.utils._http as hf_http

    monkeypatch.setattr(hf_http.time, "sleep", lambda seconds: None)  # its back-off between the retries
    hub.fail_next("/_lfs/upload/", 500, times=50)
    with pytest.raises(PublishError) as excinfo:
        publish_folder(compressed_dir, "user/lfs-fails", base_model=BASE)
    message = str(excinfo.value)
    assert "HTTP 500" in message and "could not reach" not in message and "uploading the files" in message
    assert "The Hub may be unavailable" in message and "user/lfs-fails" not in hub.repos


def test_dense_model_or_unknown_base_is_refused(compressed_dir, tiny_configs):
    with pytest.raises(ValueError, match="compressed with optimum_oats"):
        publish(build_tiny_model(tiny_configs["llama"]), "user/dense")
    with pytest.raises(ValueError, match="--base-model"):
        publish_folder(compressed_dir, "user/unknown-base")
    with pytest.raises(FileNotFoundError, match="oats_report.json"):
        publish_folder(compressed_dir.parent, "user/not-a-checkpoint", base_model=BASE)


def test_token_never_leaks(hub, compressed_model, tokenizer, caplog):
    caplog.set_level("DEBUG")
    publish(
        compressed_model,
        "user/leak",
        tokenizer=tokenizer,
        eval_results=COMPRESSED,
        base_model=BASE,
        token=DEFAULT_TOKEN,
    )
    assert hub.tokens_seen == {DEFAULT_TOKEN}  # it was used...
    for label, content in hub.iter_stored_bytes():  # ...but never stored: card, report, results, plot, commit
        assert DEFAULT_TOKEN.encode() not in content, label

    hub.fail_next("/commit/", 500)
    with pytest.raises(PublishError) as failed:
        publish(compressed_model, "user/leak", base_model=BASE, token=DEFAULT_TOKEN)
    wrong = "hf_wrongtoken_do_not_print_me"
    hub.accepted_tokens = {DEFAULT_TOKEN}  # this test's server now refuses any other token
    with pytest.raises(PublishError, match="HTTP 401") as refused:
        publish(compressed_model, "user/leak", base_model=BASE, token=wrong)
    for error, secret in ((failed.value, DEFAULT_TOKEN), (refused.value, wrong)):
        assert secret not in "".join(traceback.format_exception(error))
    assert DEFAULT_TOKEN not in caplog.text and wrong not in caplog.text
