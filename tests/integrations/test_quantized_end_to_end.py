"""A quantized checkpoint end to end, on the real code paths: compress (4-bit values, 8-bit U V), save, reload
bit-exactly through `trust_remote_code` in a fresh process (what tools that cannot import the plugin do), score with
the stock `lm_eval` command line on the offline task files, push to the (loopback) Hub with its card, and load it
back from the Hub bit-exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from optimum_oats import OATSConfig, compression_report
from optimum_oats.evaluation import lm_eval_tasks_dir, summarize_results
from optimum_oats.hub.publish import publish_folder

pytestmark = pytest.mark.slow  # two subprocesses (a fresh reload and the stock lm_eval CLI): ~30-60 s

REPO_ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])
TASKS = ("arc_easy", "boolq")
LIMIT = 4


@pytest.fixture(scope="module")
def w4_dir(tmp_path_factory, dense_dir, calibration_texts, tokenizer) -> Path:
    config = OATSConfig(
        method="hassle",
        compression_rate=0.3,
        dataset=calibration_texts[:200],
        num_samples=2,
        seqlen=32,
        method_settings={"num_iterations": 4, "hessian_iterations": 1},
        value_bits=4,
        lowrank_bits=8,
        group_size=32,
    )
    model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)
    path = tmp_path_factory.mktemp("w4-uv8")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # the stock CLI loads the tokenizer from the checkpoint folder
    torch.save(model(IDS).logits, path.parent / f"{path.name}-expected_logits.pt")  # outside: would be pushed
    return path


def _expected(path: Path) -> torch.Tensor:
    return torch.load(path.parent / f"{path.name}-expected_logits.pt")


def _env(**extra: str) -> dict[str, str]:
    """A fresh process's environment: this checkout first on the path, fully offline."""
    env = {k: v for k, v in os.environ.items() if k != "OATS_DATA_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def test_trust_remote_code_reload_is_bit_exact_without_importing_the_plugin(w4_dir):
    """The loading path of the stock CLI: no `import optimum_oats`; the checkpoint's `modeling_oats.py` imports it."""
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'optimum_oats' not in sys.modules\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(w4_dir)!r}, trust_remote_code=True)\n"
        "assert 'optimum_oats' in sys.modules\n"
        "from optimum_oats import LinearSparseLowRank\n"
        "layers = [x for x in m.modules() if isinstance(x, LinearSparseLowRank)]\n"
        "assert len(layers) == 14, len(layers)\n"
        "assert m.config.quantization_config.value_bits == 4\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        f"expected = torch.load({str(w4_dir.parent / f'{w4_dir.name}-expected_logits.pt')!r})\n"
        "assert torch.equal(m(ids).logits, expected)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]


def test_stock_lm_eval_scores_then_push_with_card_and_reload_from_hub(w4_dir, data_dir, tmp_path, hub):
    """`lm_eval --model hf --model_args pretrained=DIR,dtype=float32,trust_remote_code=True ...` (README), its
    scores into the pushed card's model-index, and the pushed checkpoint back from the Hub bit-exactly."""
    output = tmp_path / "lm_eval"
    script = Path(sys.executable).with_name("lm_eval")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]
    command += [
        "--model", "hf",
        "--model_args", f"pretrained={w4_dir},dtype=float32,trust_remote_code=True",
        "--tasks", ",".join(TASKS),
        "--device", "cpu",
        "--limit", str(LIMIT),
        "--include_path", lm_eval_tasks_dir(),
        "--output_path", str(output),
    ]  # fmt: skip
    env = _env(OATS_DATA_DIR=str(data_dir))
    env.pop("HF_ENDPOINT", None)  # the hub fixture's loopback server is for the push below, not for lm_eval
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (results_file,) = output.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["configs"]["arc_easy"]["dataset_path"] == "arc/ARC-Easy-Test.jsonl"  # the offline definition
    for task in TASKS:
        assert results["n-samples"][task]["effective"] == LIMIT
        assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
    scores = summarize_results(results)

    # `oats push DIR --eval-json ...` is this call; the folder is only read.
    before = sorted(p.name for p in w4_dir.iterdir())
    publish_folder(w4_dir, "user/tiny-w4", eval_results=scores, base_model="user/tiny-dense")
    assert sorted(p.name for p in w4_dir.iterdir()) == before
    files = hub.repo("user/tiny-w4").files()
    assert {"config.json", "model.safetensors", "modeling_oats.py", "oats_report.json", "README.md"} <= set(files)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["value_bits"] == 4

    again = AutoModelForCausalLM.from_pretrained("user/tiny-w4")
    assert torch.equal(again(IDS).logits, _expected(w4_dir))

    report = compression_report(again)
    card = ModelCard(files["README.md"].decode())
    row = "| Bits per weight (values, mask, scales and factors of the compressed layers) |"
    assert f"{row} {report.bits_per_weight:.3f} |" in card.text
    assert "4-bit values, 1-bit mask, 8-bit U, V" in card.text and "one fp16 scale per 32 input columns" in card.text
    indexed = {(r.task_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert indexed == {(t, m): scores[t][m] for t in TASKS for m in ("acc", "acc_norm") if m in scores[t]}
