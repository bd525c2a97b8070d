"""Offline lm-eval tasks (`optimum_oats/lm_eval_tasks`) and `evaluate_lm_eval`, run for real on the local files."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from optimum_oats.evaluation import (
    OFFLINE_TASKS,
    ZERO_SHOT_TASKS,
    build_task_manager,
    evaluate_lm_eval,
    lm_eval_tasks_dir,
    summarize_results,
)
from optimum_oats.evaluation.harness import check_offline_resolution

REPO_ROOT = Path(__file__).resolve().parents[2]


def _task_utils():
    """The task folder's utils module, loaded from its path as lm-eval does."""
    spec = importlib.util.spec_from_file_location("oats_lm_eval_task_utils", Path(lm_eval_tasks_dir()) / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_task_folder_defines_the_offline_tasks():
    from lm_eval.tasks._yaml_loader import load_yaml

    names = {load_yaml(p, resolve_func=False)["task"] for p in Path(lm_eval_tasks_dir()).glob("*.yaml")}
    assert names == set(OFFLINE_TASKS)
    assert set(ZERO_SHOT_TASKS) < set(OFFLINE_TASKS)


def test_include_path_overrides_the_stock_tasks(data_dir):
    """With the stock tasks indexed too, every offline name must resolve to our YAML (lm-eval 0.4.13 semantics)."""
    manager = build_task_manager(data_dir, include_defaults=True)
    assert "mmlu" in manager.all_tasks  # the stock tasks are there...
    check_offline_resolution(manager, OFFLINE_TASKS)  # ...but ours win
    task = manager.load(["boolq"])["tasks"]["boolq"]
    assert task.config.dataset_path == "boolq/val.jsonl"
    assert len(task.eval_docs) == 3270


def test_check_offline_resolution_rejects_stock_definitions():
    stock = SimpleNamespace(task_index={"boolq": SimpleNamespace(yaml_path="/x/lm_eval/tasks/super_glue/boolq.yaml")})
    with pytest.raises(RuntimeError, match="boolq"):
        check_offline_resolution(stock, ["boolq"])
    check_offline_resolution(stock, ["mmlu"])  # not an offline task: not checked


# task -> (number of documents, first prompt, first target, first choices)
EXPECTED_FIRST_DOCS = {
    "boolq": (3270, "Ethanol fuel -- All biomass", 0, ["no", "yes"]),
    "rte": (
        277,
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
        "Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:",
        1,
        ["True", "False"],
    ),
    "hellaswag": (
        10042,
        "Roof shingle removal: A man is sitting on a roof. He",
        3,
        [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
    ),
    "winogrande": (
        1267,
        1,
        "always got the easier cases.",
        [
            "Sarah was a much better surgeon than Maria so Sarah",
            "Sarah was a much better surgeon than Maria so Maria",
        ],
    ),
    "arc_easy": (
        2376,
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        0,
        [
            "Sunlight is the source of energy for nearly all ecosystems.",
            "Most ecosystems are found on land instead of in water.",
            "Carbon dioxide is more available than other gases.",
            "The producers in all ecosystems are plants.",
        ],
    ),
    "arc_challenge": (
        1172,
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most "
        "likely effect of this increase in rotation?\nAnswer:",
        2,
        [
            "Planetary density will decrease.",
            "Planetary years will become longer.",
            "Planetary days will become shorter.",
            "Planetary gravity will become stronger.",
        ],
    ),
    "openbookqa": (
        500,
        "A person wants to start saving money so that they can afford a nice vacation at the end of the year. After "
        "looking over their budget and expenses, they decide the best way to save money is to",
        1,
        ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"],
    ),
    "piqa": (
        1838,
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        0,
        [
            "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will "
            "also need to supply it with a water bottle and a food dish.",
            "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you "
            "will also need to supply it with a water bottle and a food dish.",
        ],
    ),
}


def test_offline_tasks_render_like_the_stock_tasks(data_dir):
    tasks = build_task_manager(data_dir).load(list(OFFLINE_TASKS))["tasks"]
    assert set(tasks) == set(OFFLINE_TASKS)
    for name, (n_docs, prompt, target, choices) in EXPECTED_FIRST_DOCS.items():
        task = tasks[name]
        docs = task.eval_docs
        assert len(docs) == n_docs, name
        first = docs[0]
        text = task.doc_to_text(first)
        assert text.startswith(prompt) if isinstance(prompt, str) else text == prompt, name
        assert task.doc_to_target(first) == target, name
        assert task.doc_to_choice(first) == choices, name
        # the first documents all have a valid gold answer among their choices (full check below, on raw rows)
        for doc in docs.select(range(50)):
            n_choices = len(task.doc_to_choice(doc))
            gold = task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)
            assert n_choices >= 2 and isinstance(gold, int) and 0 <= gold < n_choices, (name, doc)
    for name in ("arc_easy", "arc_challenge", "openbookqa"):
        assert all(doc["answerKey"] in doc["choices"]["label"] for doc in tasks[name].eval_docs), name
    assert all(len(doc["choices"]["text"]) == 4 for doc in tasks["openbookqa"].eval_docs)
    assert all(len(doc["choices"]) == 4 and 0 <= doc["gold"] < 4 for doc in tasks["hellaswag"].eval_docs)
    assert {doc["label"] for doc in tasks["piqa"].eval_docs} == {0, 1}
    assert {doc["label"] for doc in tasks["boolq"].eval_docs} == {0, 1}
    assert {doc["label"] for doc in tasks["rte"].eval_docs} == {0, 1}
    assert {doc["gold"] for doc in tasks["winogrande"].eval_docs} == {0, 1}

    wikitext = tasks["wikitext"]
    pages = wikitext.eval_docs
    assert len(pages) == 62  # EleutherAI/wikitext_document_level, wikitext-2-raw-v1, test
    assert pages[0]["page"].startswith(" = Robert Boulter = \n")
    assert all(re.match(r" = [^=]", page["page"]) for page in pages)
    assert wikitext.doc_to_target(pages[0]).startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, ")
    assert wikitext.config.training_split is None
    assert len(wikitext.dataset["validation"]) == 60


def test_hellaswag_recapitalises_the_second_fragment():
    recap = _task_utils()._recapitalise
    assert recap("Roof shingle removal: A man is sitting on a roof. he") == (
        "Roof shingle removal: A man is sitting on a roof. He"
    )
    assert recap("Canoeing: Two women are shown. the child and a different man") == (
        "Canoeing: Two women are shown. The child and a different man"
    )
    unchanged = [
        "Getting a piercing: 3 the guy puts a ring in. 4 the guy cleans up. 5 the guy",
        "Personal Care and Style: How to do a french manicure. Prepare your nails.",
        'Camel ride: . " a camel ride - desrt of doha - qatar "',
    ]
    for query in unchanged:
        assert recap(query) == query


def test_task_loader_without_data_dir_names_the_env_var(monkeypatch, data_dir):
    utils = _task_utils()
    monkeypatch.delenv("OATS_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="OATS_DATA_DIR"):
        utils.load_boolq()
    assert len(utils.load_boolq(data_dir=str(data_dir))["validation"]) == 3270
    monkeypatch.setenv("OATS_DATA_DIR", str(data_dir))
    assert len(utils.load_rte(version=1.0, pretrained="ignored")["validation"]) == 277


def test_evaluate_lm_eval_without_data_dir_names_the_env_var(monkeypatch, tiny_lm, tokenizer, tmp_path):
    monkeypatch.delenv("OATS_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="OATS_DATA_DIR"):
        evaluate_lm_eval(tiny_lm, tokenizer, "boolq")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_lm_eval(tiny_lm, tokenizer, "boolq", data_dir=tmp_path / "nowhere")


def test_summarize_results_flattens_and_averages():
    results = {
        "results": {
            name: {"alias": name, "sample_len": 4, "acc,none": 0.5, "acc_stderr,none": 0.1}
            | ({"acc_norm,none": 0.75, "acc_norm_stderr,none": "N/A"} if name in ("hellaswag", "piqa") else {})
            for name in ZERO_SHOT_TASKS
        }
        | {"wikitext": {"alias": "wikitext", "word_perplexity,none": 20.0, "word_perplexity_stderr,none": "N/A"}},
        "n-samples": {"boolq": {"original": 3270, "effective": 4}},
    }
    summary = summarize_results(results)
    assert summary["boolq"] == {"acc": 0.5, "acc_stderr": 0.1, "n_samples": 4}
    assert summary["piqa"] == {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.75}
    assert summary["wikitext"] == {"word_perplexity": 20.0}
    assert summary["zero_shot_mean"] == pytest.approx((6 * 0.5 + 2 * 0.75) / 8)
    del results["results"]["rte"]
    assert "zero_shot_mean" not in summarize_results(results)


def test_evaluate_lm_eval_zero_shot_tasks(tiny_lm, tokenizer, data_dir, caplog):
    with caplog.at_level(logging.INFO):
        summary = evaluate_lm_eval(tiny_lm, tokenizer, ZERO_SHOT_TASKS, data_dir=data_dir, limit=2, batch_size=4)
    # lm-eval's warnings about how this package calls it (not the user's concern) are gone; nothing else is hidden.
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert not [w for w in warnings if "launch via accelerate" in w or "Custom kwargs" in w or "Overwriting" in w]
    assert not [w for w in warnings if "aggregation is not" in w or "higher_is_better is not" in w]
    assert any("Building contexts" in record.getMessage() for record in caplog.records)  # other messages still pass
    scores = []
    for name in ZERO_SHOT_TASKS:
        metrics = summary[name]
        assert metrics["n_samples"] == 2
        assert 0.0 <= metrics["acc"] <= 1.0
        assert ("acc_norm" in metrics) == (name in ("hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa"))
        scores.append(metrics.get("acc_norm", metrics["acc"]))
    assert summary["zero_shot_mean"] == pytest.approx(sum(scores) / len(scores))


def test_wikitext_word_perplexity_matches_a_direct_computation(tiny_lm, tokenizer, data_dir):
    """lm-eval's document-level word perplexity of the first article, recomputed by hand (one rolling window)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    page = _task_utils().wikitext_pages(data_dir / "wikitext2" / "wiki.test.raw")[0]
    tokens = tokenizer.encode(wikitext_detokenizer({"page": page}))
    assert len(tokens) < 8192
    inputs = torch.tensor([[tokenizer.bos_token_id, *tokens[:-1]]])  # lm-eval's prefix token
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny_lm(inputs).logits[0].float(), dim=-1)
    loglikelihood = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].sum().item()
    words = len(re.split(r"\s+", page))
    expected = math.exp(-loglikelihood / words)

    summary = evaluate_lm_eval(tiny_lm, tokenizer, "wikitext", data_dir=data_dir, limit=1, max_length=8192)
    assert summary["wikitext"]["n_samples"] == 1
    assert summary["wikitext"]["word_perplexity"] == pytest.approx(expected, rel=1e-4)
    assert summary["wikitext"]["bits_per_byte"] == pytest.approx(
        -loglikelihood / len(page.encode()) / math.log(2), rel=1e-4
    )


@pytest.mark.slow
def test_smollm2_arc_easy_beats_chance(smollm2, smollm2_tokenizer, data_dir):
    summary = evaluate_lm_eval(smollm2, smollm2_tokenizer, "arc_easy", data_dir=data_dir, limit=20, batch_size=8)
    # chance is 0.25; SmolLM2-135M-Instruct gets 12/20 (acc) and 8/20 (acc_norm) on these documents
    assert summary["arc_easy"]["acc"] >= 0.45
    assert summary["arc_easy"]["acc_norm"] > 0.3


# ----------------------------------------------------------------------------------------------- stock lm_eval CLI


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_lm, tokenizer) -> str:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OATS_DATA_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run_stock_cli(model_dir: str, output: Path, env: dict[str, str], model_args: str = "dtype=float32") -> dict:
    """Run the documented command:

    OATS_DATA_DIR=... lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --tasks boolq,arc_easy \
        --device cpu --limit 5 --include_path "$(python -m optimum_oats.evaluation.tasks_path)"
    """
    include_path = subprocess.run(
        [sys.executable, "-m", "optimum_oats.evaluation.tasks_path"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert include_path == lm_eval_tasks_dir()

    script = Path(sys.executable).with_name("lm_eval")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]
    command += [
        "--model", "hf",
        "--model_args", f"pretrained={model_dir},{model_args}",
        "--tasks", "boolq,arc_easy",
        "--device", "cpu",
        "--limit", "5",
        "--include_path", include_path,
        "--output_path", str(output),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=output.parent, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (results_file,) = output.rglob("results_*.json")
    return json.loads(results_file.read_text())


def _check_cli_results(results: dict) -> None:
    for name, dataset_path in (("boolq", "boolq/val.jsonl"), ("arc_easy", "arc/ARC-Easy-Test.jsonl")):
        assert results["configs"][name]["dataset_path"] == dataset_path  # our definition, not the stock one
        assert results["n-samples"][name]["effective"] == 5
        assert 0.0 <= results["results"][name]["acc,none"] <= 1.0
    assert results["n-samples"]["arc_easy"]["original"] == 2376


@pytest.mark.slow
def test_stock_lm_eval_cli(tiny_model_dir, data_dir, tmp_path):
    env = _cli_env(OATS_DATA_DIR=str(data_dir))
    _check_cli_results(_run_stock_cli(tiny_model_dir, tmp_path / "out", env))


@pytest.mark.slow
def test_stock_lm_eval_cli_scores_compressed_checkpoint(tiny_model_dir, tokenizer, data_dir, tmp_path):
    """The stock CLI cannot import the plugin; the checkpoint's `modeling_oats.py` does, under trust_remote_code."""
    from transformers import AutoModelForCausalLM

    from optimum_oats import OATSConfig

    cfg = OATSConfig(dataset=["calibration text " * 200], num_samples=1, seqlen=32, num_iterations=2)
    compressed = tmp_path / "compressed"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=cfg).save_pretrained(compressed)
    tokenizer.save_pretrained(compressed)
    env = _cli_env(OATS_DATA_DIR=str(data_dir))
    results = _run_stock_cli(str(compressed), tmp_path / "out", env, "dtype=float32,trust_remote_code=True")
    _check_cli_results(results)
