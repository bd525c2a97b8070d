"""`optimum-cli oats {compress,evaluate,push}` and the `optimum-oats` console script, on a tiny model."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from optimum_oats import LinearSparseLowRank, OATSConfig
from optimum_oats.algorithms import HassleSettings, OATSSettings, method_info, method_names
from optimum_oats.hub.card import DEFAULT_MODEL_HUB_ID
from tests.helpers.hub_server import DEFAULT_TOKEN

# Small enough that compressing the tiny model takes about a second.
FAST_COMPRESS = ["--num-samples", "2", "--seqlen", "32", "--num-iterations", "4"]
OPTIMUM_CLI = [sys.executable, "-m", "optimum.commands.optimum_cli"]


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
    """Run `optimum-oats ARGV` in-process; returns the exit status and the stdout lines."""
    from optimum.commands.register.oats import main

    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue().splitlines()


def last_json(lines: list[str]) -> dict:
    """The JSON summary every command prints as its last stdout line."""
    assert lines, "the command printed nothing on stdout"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory, data_dir) -> Path:
    """A few kB of WikiText-2 validation text, as a `.txt` calibration file."""
    text = (data_dir / "wikitext2" / "wiki.valid.raw").read_text(encoding="utf-8")[:20_000]
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, dense_dir, calibration_file) -> tuple[Path, int, list[str]]:
    """`optimum-oats compress` run once, in-process: (output folder, exit status, stdout lines)."""
    output = tmp_path_factory.mktemp("cli") / "compressed"
    argv = ["compress", str(dense_dir), "--output", str(output), "--dataset", str(calibration_file)]
    code, lines = run_cli([*argv, *FAST_COMPRESS])
    return output, code, lines


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------------------------------------- registration
@pytest.mark.slow
def test_optimum_cli_lists_the_oats_commands(tmp_path):
    """Registered through the `optimum.commands.register` namespace of the installed distribution (cwd elsewhere)."""
    root = subprocess.run([*OPTIMUM_CLI, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert root.returncode == 0, root.stderr
    assert "oats" in root.stdout
    group = subprocess.run([*OPTIMUM_CLI, "oats", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert group.returncode == 0, group.stderr
    for command in ("compress", "evaluate", "push"):
        assert command in group.stdout
    # The compression flags are generated (from the dataclasses) when `compress` parses: through optimum-cli too.
    compress = subprocess.run(
        [*OPTIMUM_CLI, "oats", "compress", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert compress.returncode == 0, compress.stderr
    assert "--hessian-iterations" in compress.stdout and "--solver SOLVER, --svd SOLVER" in compress.stdout


@pytest.mark.slow
def test_registration_imports_nothing_heavy(tmp_path):
    """optimum-cli imports every register module at each start, whatever the command: keep ours light."""
    script = (
        "import sys\n"
        "from optimum.commands.optimum_cli import load_optimum_namespace_cli_commands\n"
        "names = [c.__name__ for c, _ in load_optimum_namespace_cli_commands()]\n"
        "assert 'OATSCommand' in names, names\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'optimum_oats') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, timeout=60)


def test_every_config_field_has_a_flag_or_is_python_only():
    from optimum_oats.commands.arguments import config_flags, undeclared_fields

    assert undeclared_fields() == []
    flags = {flag.dest for flag in config_flags()}
    for name in method_names():  # every setting of every registered method
        assert {f.name for f in dataclasses.fields(method_info(name).settings)} <= flags, name


def test_a_new_config_field_without_a_flag_is_caught():
    """The check above can fail: a field declared without `setting(...)` and not listed Python-only is reported."""
    from optimum_oats.commands.arguments import undeclared_fields

    @dataclasses.dataclass
    class Grown(OATSConfig):
        new_knob: int = 3

    assert undeclared_fields(Grown) == ["new_knob"]


def _parsed_config(*flags: str) -> OATSConfig:
    from optimum.commands.register.oats import build_parser
    from optimum_oats.commands.arguments import config_from_args

    return config_from_args(build_parser().parse_args(["compress", "model", "-o", "out", *flags]))


def test_flags_reach_the_config_and_the_method_settings():
    cfg = _parsed_config("--method", "hassle", "--rank-ratio", "0.2", "--solver", "exact", "--hessian-iterations", "3")
    assert (cfg.method, cfg.rank_ratio) == ("hassle", 0.2)
    assert cfg.method_settings == HassleSettings(solver="exact", hessian_iterations=3)
    assert _parsed_config("--svd", "exact").method_settings == OATSSettings(solver="exact")  # the old flag's name
    assert _parsed_config("--modules-to-not-convert", "a", "b").modules_to_not_convert == ["a", "b"]
    assert _parsed_config() == OATSConfig()  # no flag given: the dataclasses' defaults


def test_a_setting_of_another_method_is_an_error_naming_the_flag():
    with pytest.raises(
        ValueError, match="`--hessian-iterations` is a setting of --method hassle, not of --method oats"
    ):
        _parsed_config("--hessian-iterations", "3")


@pytest.mark.parametrize("command", ["compress", "evaluate", "push", "build-kernels"])
def test_console_script_registers_each_command(command, capsys):
    """Each command parses its own `--help`: a command left unregistered is an argparse error (exit 2)."""
    from optimum.commands.register.oats import main

    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: optimum-oats {command}")


def test_console_script_usage_lists_the_registered_commands(capsys):
    from optimum.commands.register.oats import OATSCommand, main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    names = ",".join(info.name for info in OATSCommand.SUBCOMMANDS)
    assert capsys.readouterr().out.startswith(f"usage: optimum-oats [-h] {{{names}}} ...")


# ----------------------------------------------------------------------------------------------- compress
def test_compress_in_process(compressed):
    output, code, lines = compressed
    assert code == 0
    summary = last_json(lines)
    assert summary["command"] == "compress" and summary["ok"] is True
    assert summary["compressed_layers"] == 14 and summary["output"] == str(output.resolve())
    assert 0 < summary["kept_fraction"] < 1
    assert {"config.json", "model.safetensors", "oats_report.json", "tokenizer.json"} <= {
        p.name for p in output.iterdir()
    }
    model = AutoModelForCausalLM.from_pretrained(output)
    assert sum(isinstance(m, LinearSparseLowRank) for m in model.modules()) == 14
    config = model.config.quantization_config
    assert (config.num_samples, config.seqlen, config.method_settings.num_iterations) == (2, 32, 4)


def test_compress_quantized_prints_bits_per_weight(dense_dir, calibration_file, tmp_path):
    output = tmp_path / "quantized"
    argv = ["compress", str(dense_dir), "--output", str(output), "--dataset", str(calibration_file), *FAST_COMPRESS]
    code, lines = run_cli([*argv, "--value-bits", "4", "--lowrank-bits", "8", "--group-size", "32"])
    assert code == 0
    summary = last_json(lines)
    config = AutoModelForCausalLM.from_pretrained(output).config.quantization_config
    assert (config.value_bits, config.lowrank_bits, config.group_size) == (4, 8, 32)
    # 4-bit values + mask + scales + 8-bit factors at rho 0.5: far below the ~17 bits of fp32 values alone
    assert 2 < summary["bits_per_weight"] < 5
    plain = last_json(run_cli([*argv[:3], str(tmp_path / "plain"), *argv[4:]])[1])
    assert plain["bits_per_weight"] > 15  # fp32 values and factors, 1-bit mask


def test_compress_bad_option_ends_with_a_json_error(dense_dir, tmp_path):
    output = tmp_path / "out"
    code, lines = run_cli(["compress", str(dense_dir), "--output", str(output), "--compression-rate", "1.5"])
    assert code == 1
    summary = last_json(lines)
    assert summary["ok"] is False and "compression_rate" in summary["error"]
    assert not output.exists()


@pytest.mark.slow
def test_compress_subprocess_smoke(dense_dir, calibration_file, tmp_path):
    output = tmp_path / "out"
    argv = ["oats", "compress", str(dense_dir), "-o", str(output), "--dataset", str(calibration_file), *FAST_COMPRESS]
    result = subprocess.run(
        [*OPTIMUM_CLI, *argv], cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["compressed_layers"] == 14
    assert "Compressing (oats)" in result.stderr  # the library's tqdm bar
    assert (output / "oats_report.json").is_file()


# ----------------------------------------------------------------------------------------------- evaluate
def test_evaluate_prints_both_models_side_by_side(compressed, dense_dir, data_dir, tmp_path):
    output, _, _ = compressed
    results = tmp_path / "eval.json"
    argv = ["evaluate", str(output), "--dense", str(dense_dir), "--tasks", "boolq", "--limit", "2"]
    argv += ["--seqlen", "32", "--max-windows", "2", "--data-dir", str(data_dir), "--output", str(results)]
    code, lines = run_cli(argv)
    assert code == 0
    table = "\n".join(lines[:-1])
    assert "| Task | Metric | Dense | Compressed | Δ | Samples |" in table
    assert "| wikitext2 | token_perplexity |" in table and "| boolq | acc |" in table
    summary = last_json(lines)
    assert summary["compressed"]["wikitext2"]["token_perplexity"] > 1
    assert summary["dense"]["boolq"]["n_samples"] == 2
    assert json.loads(results.read_text())["dense_model"] == str(dense_dir)
    beside = json.loads((output / "eval_results.json").read_text())  # what save/push cards read back
    assert beside["compressed"]["boolq"]["n_samples"] == 2 and beside["base_model"] == str(dense_dir)


# ----------------------------------------------------------------------------------------------- push
def test_push_uses_eval_json_and_infers_base_model(hub, compressed, tmp_path):
    output, _, _ = compressed
    results = tmp_path / "eval.json"
    results.write_text(
        json.dumps(
            {
                "dense_model": "default",
                "compressed": {"boolq": {"acc": 0.5, "n_samples": 2}},
                "dense": {"boolq": {"acc": 0.75, "n_samples": 2}},
            }
        )
    )
    code, lines = run_cli(
        ["push", str(output), "--repo-id", "user/cli-oats", "--private", "--eval-json", str(results)]
    )
    assert code == 0
    summary = last_json(lines)
    assert summary["ok"] is True and summary["base_model"] == DEFAULT_MODEL_HUB_ID
    repo = hub.repo("user/cli-oats")
    assert repo.private and len(repo.log()) == 2
    card = ModelCard(repo.files()["README.md"].decode())
    assert card.data.base_model == DEFAULT_MODEL_HUB_ID and card.data.license == "apache-2.0"
    assert "| boolq | acc | 0.75 | 0.5 | -0.25 | 2 |" in card.text


def test_push_failure_exits_1_with_reason(hub, compressed):
    output, _, _ = compressed
    hub.fail_next("/commit/", 500)
    code, lines = run_cli(["push", str(output), "--repo-id", "user/cli-fails", "--base-model", "a/b"])
    assert code == 1
    summary = last_json(lines)
    assert summary["ok"] is False and "HTTP 500" in summary["error"]
    assert DEFAULT_TOKEN not in "\n".join(lines)
    assert (output / "config.json").is_file()
