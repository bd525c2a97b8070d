"""`benchmarks/zero_shot_stock.py`: the stock `lm_eval` call it makes per (model, task), resuming, and its table.
A stand-in `lm_eval` executable records its arguments and writes a results file shaped like lm-eval 0.4.13's."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import stat
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a benchmark script (tests/test_markers.py)

PATHS = {"boolq": "boolq/val.jsonl", "arc_easy": "arc/ARC-Easy-Test.jsonl"}

FAKE_LM_EVAL = """#!{python}
import json, sys
from pathlib import Path
argv = sys.argv[1:]
get = lambda flag: argv[argv.index(flag) + 1]
task = get("--tasks")
with open({log!r}, "a") as log:
    log.write(json.dumps(argv) + "\\n")
paths = {paths!r}
result = {{"acc,none": 0.5, "acc_stderr,none": 0.02, "alias": task}}
if task == "arc_easy":
    result.update({{"acc_norm,none": 0.6, "acc_norm_stderr,none": 0.03}})
raw = {{
    "results": {{task: result}},
    "configs": {{task: {{"dataset_path": paths.get(task, "stock/" + task)}}}},
    "n-samples": {{task: {{"original": 1000, "effective": int(get("--limit"))}}}},
    "lm_eval_version": "0.4.13",
    "transformers_version": "x",
}}
out = Path(get("--output_path")) / "model"
out.mkdir(parents=True)
(out / "results_2026.json").write_text(json.dumps(raw))
"""


@pytest.fixture(scope="module")
def stock():
    return importlib.import_module("zero_shot_stock")  # benchmarks/ is on sys.path (tests/benchmarks/conftest.py)


@pytest.fixture
def fake_lm_eval(tmp_path) -> tuple[Path, Path]:
    log = tmp_path / "calls.jsonl"
    script = tmp_path / "lm_eval"
    script.write_text(FAKE_LM_EVAL.format(python=sys.executable, log=str(log), paths=PATHS))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, log


def _args(tmp_path: Path, script: Path, models: list[str], tasks: list[str]) -> argparse.Namespace:
    return argparse.Namespace(
        model=models,
        tasks=tasks,
        limit=7,
        batch_size=8,
        lm_eval=str(script),
        output=tmp_path / "out",
        table_only=False,
    )


def test_one_call_per_task_resumes_and_loads_oats_checkpoints_with_remote_code(
    stock, fake_lm_eval, tmp_path, data_dir, monkeypatch
):
    monkeypatch.setenv("OATS_DATA_DIR", str(data_dir))
    script, log = fake_lm_eval
    oats_dir, plain_dir = tmp_path / "oats", tmp_path / "plain"
    oats_dir.mkdir()
    plain_dir.mkdir()
    (oats_dir / "modeling_oats.py").write_text("")
    args = _args(tmp_path, script, [f"q4={oats_dir}", f"peer={plain_dir}"], ["boolq", "arc_easy"])
    for spec in args.model:
        stock.run_model(spec, args)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 4
    model_args = [c[c.index("--model_args") + 1] for c in calls]
    assert model_args[:2] == [f"pretrained={oats_dir},dtype=float32,trust_remote_code=True"] * 2
    assert model_args[2:] == [f"pretrained={plain_dir},dtype=float32"] * 2
    for call in calls:
        assert call[call.index("--limit") + 1] == "7" and call[call.index("--batch_size") + 1] == "8"
        assert call[call.index("--include_path") + 1] == stock.lm_eval_tasks_dir()
    stored = json.loads((tmp_path / "out" / "q4.json").read_text())
    assert stored["tasks"]["arc_easy"]["acc_norm"] == 0.6 and stored["tasks"]["boolq"]["n_samples"] == 7
    assert stored["tasks"]["boolq"]["dataset_path"] == "boolq/val.jsonl"

    stock.run_model(args.model[0], args)  # everything stored: no call
    assert len(log.read_text().splitlines()) == 4

    args.table_only, args.model = True, ["q4", "peer", "missing"]
    lines = stock.table(args).splitlines()
    assert lines[0] == "| task | metric | n | q4 | peer |"
    assert lines[2] == "| boolq | acc | 7 | 0.500 ± 0.020 | 0.500 ± 0.020 |"
    assert lines[3] == "| arc_easy | acc_norm | 7 | 0.600 ± 0.030 | 0.600 ± 0.030 |"
    assert f"**{0.55:.4f}** ± {math.sqrt(0.02**2 + 0.03**2) / 2:.4f}" in lines[4]


def test_a_task_resolved_to_the_stock_definition_is_refused(stock, fake_lm_eval, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("OATS_DATA_DIR", str(data_dir))
    script, _ = fake_lm_eval
    args = _args(tmp_path, script, [f"m={tmp_path}"], ["piqa"])  # the stand-in answers a Hub-style path
    with pytest.raises(RuntimeError, match="piqa resolved to 'stock/piqa'"):
        stock.run_model(args.model[0], args)
