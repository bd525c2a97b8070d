"""Issue 33, item 5: weak messages and silent acceptances. Each case names the file or setting in its message, and
every test here failed on the code before the fix."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_oats import LinearSparseLowRank, compress
from optimum_oats.data.text import CalibrationDataError
from optimum_oats.engine.preflight import FORCE_SEQLEN_ENV
from optimum_oats.engine.report import REPORT_FILE
from tests.commands.test_cli import last_json, run_cli
from tests.helpers.compressed import tiny_oats_config
from tests.helpers.tiny_models import build_tiny_model

IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])


def _compressed(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LinearSparseLowRank)]


@pytest.fixture(scope="module")
def texts(calibration_texts) -> list[str]:
    return calibration_texts[:100]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


# ----------------------------------------------------------------------------------------------- oats_report.json
def test_report_is_written_with_the_umask_mode(checkpoint):
    """Not 0600 (tempfile.mkstemp's mode, which the atomic rename used to carry over): a plain `open()` would give
    0666 less the umask. (`model.safetensors` is 0600 whatever the model: safetensors' own writer chooses that.)"""
    umask = os.umask(0o022)
    os.umask(umask)
    for name in (REPORT_FILE, "config.json", "modeling_oats.py", "README.md"):
        assert (checkpoint / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize(
    "content",
    [
        "{not json",  # JSONDecodeError before
        "[1, 2]",  # AttributeError before
        '{"layers": 3}',  # TypeError before
        '{"layers": [7, {"name": "model.layers.0.mlp.up_proj", "relative_error": "high"}]}',
        b"\xff\xfe\x00",  # UnicodeDecodeError before
    ],
    ids=["not-json", "a-list", "layers-not-a-list", "bad-entries", "not-utf8"],
)
def test_malformed_report_warns_naming_the_file_and_the_checkpoint_loads(content, checkpoint, tmp_path, caplog):
    folder = shutil.copytree(checkpoint, tmp_path / "ckpt")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint)(IDS).logits
    path = folder / REPORT_FILE
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING, logger="optimum_oats"):
        model = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(model(IDS).logits, reference)
    assert str(path) in caplog.text and "save the model again" in caplog.text.lower()
    model.save_pretrained(tmp_path / "resaved")  # the report is rewritten whole
    assert json.loads((tmp_path / "resaved" / REPORT_FILE).read_text())["layers"]


# ----------------------------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """The checks below must fail before the weights load (calibration comes after the load)."""
    import optimum_oats.commands.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(runner, "load_model", refuse)


def test_cli_compress_of_gpt2_prints_the_summary_with_the_reason(gpt2_dir, tmp_path, no_model_load):
    code, lines = run_cli(["compress", str(gpt2_dir), "--output", str(tmp_path / "out"), "--seqlen", "32"])
    summary = last_json(lines)
    assert code == 1 and summary["ok"] is False
    assert summary["error"].startswith("UnsupportedArchitectureError: `transformer.h.0.attn.c_attn` is a Conv1D")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_cli_missing_local_model_path_is_named_as_a_path(relative, tmp_path, monkeypatch):
    missing = tmp_path / "models" / "my-compressed"
    if relative:
        monkeypatch.chdir(tmp_path)
        name = "./models/my-compressed"
    else:
        name = str(missing)
    code, lines = run_cli(["compress", name, "--output", str(tmp_path / "out")])
    error = last_json(lines)["error"]
    assert code == 1 and error.startswith(f"FileNotFoundError: Model path {name!r} does not exist")
    assert str(missing) in error and "repo id" not in error.lower()


def test_cli_nm_width_is_checked_before_the_model_loads(dense_dir, tmp_path, no_model_load):
    argv = ["compress", str(dense_dir), "--output", str(tmp_path / "out"), "--sparsity-pattern", "1:3"]
    code, lines = run_cli(argv)
    error = last_json(lines)["error"]
    assert (
        code == 1 and "`sparsity_pattern='1:3'` needs every compressed layer's input width divisible by M=3" in error
    )
    assert "`model.layers.0.self_attn.q_proj` (64)" in error


def test_cli_seqlen_beyond_the_positions_is_checked_before_the_model_loads(dense_dir, tmp_path, no_model_load):
    code, lines = run_cli(["compress", str(dense_dir), "--output", str(tmp_path / "out"), "--seqlen", "100000"])
    error = last_json(lines)["error"]
    assert code == 1 and "`seqlen=100000` is above the model's `max_position_embeddings=2048`" in error
    assert "OATS_FORCE_SEQLEN=1" in error


# ----------------------------------------------------------------------------------------------- settings vs shapes
@pytest.mark.parametrize("method", ["oats", "wanda"])
def test_a_rate_that_keeps_nothing_is_an_error_naming_the_setting_and_layer(method, tiny_llama, tokenizer, texts):
    config = tiny_oats_config(texts, compression_rate=0.999999, method=method)
    pattern = r"`model\.layers\.0\.[a-z_.]+`: `compression_rate=0\.999999` keeps nothing of a \d+x\d+ layer"
    with pytest.raises(ValueError, match=pattern):
        compress(tiny_llama, config, tokenizer, progress=False)
    assert not _compressed(tiny_llama)


def test_layer_budget_refuses_to_keep_nothing_and_says_the_largest_rate():
    from optimum_oats.algorithms import layer_budget

    assert layer_budget(64, 128, 1 - 1 / 128, 0.25).keep_per_row == 1  # the largest rate that keeps something
    with pytest.raises(ValueError, match=r"keeps nothing of a 64x128 layer.*<= 0\.992188"):
        layer_budget(64, 128, 0.999, 0.25)


def test_nm_width_is_checked_before_any_data_is_read(tiny_llama, tokenizer, tmp_path):
    """The dataset does not exist: the N:M error comes first, so no calibration was attempted."""
    config = tiny_oats_config(str(tmp_path / "never-read.txt"), sparsity_pattern="1:3")
    with pytest.raises(ValueError, match=r"`sparsity_pattern='1:3'`.*`model\.layers\.0\.self_attn\.q_proj` \(64\)"):
        compress(tiny_llama, config, tokenizer, progress=False)


def test_compress_on_load_checks_the_settings_before_the_weights_load(dense_dir, tmp_path, monkeypatch):
    """`from_pretrained(quantization_config=...)`: refused on the weightless skeleton, before the weights load."""
    from optimum_oats.integrations.quantizer import OATSHfQuantizer

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the settings were checked")

    monkeypatch.setattr(OATSHfQuantizer, "_process_model_after_weight_loading", refuse)
    config = tiny_oats_config(str(tmp_path / "never-read.txt"), sparsity_pattern="1:3")
    with pytest.raises(ValueError, match=r"`sparsity_pattern='1:3'` needs every compressed layer's input width"):
        AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)


def test_seqlen_beyond_the_positions_is_an_error_unless_forced(tiny_configs, tokenizer, texts, monkeypatch, caplog):
    short = copy.deepcopy(tiny_configs["llama"])
    short.max_position_embeddings = 16
    with pytest.raises(ValueError, match=r"`seqlen=32` is above the model's `max_position_embeddings=16`"):
        compress(build_tiny_model(short), tiny_oats_config(texts), tokenizer, progress=False)
    monkeypatch.setenv(FORCE_SEQLEN_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="optimum_oats"):
        model = compress(build_tiny_model(short), tiny_oats_config(texts), tokenizer, progress=False)
    assert _compressed(model) and f"Going on because {FORCE_SEQLEN_ENV} is set" in caplog.text


def test_encoders_cap_their_length_instead(tokenizer, texts):
    """Encoders take documents cut at the model's length, so a long `seqlen` is no error there."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, vocab_size=len(tokenizer),
    )  # fmt: skip
    model = compress(BertModel(config).eval(), tiny_oats_config(texts, seqlen=4096), tokenizer, progress=False)
    assert _compressed(model)


# ----------------------------------------------------------------------------------------------- calibration data
def test_an_empty_dataset_folder_is_named(tiny_llama, tokenizer, tmp_path):
    folder = tmp_path / "calibration"
    folder.mkdir()
    with pytest.raises(CalibrationDataError, match=f"Calibration folder {re.escape(str(folder))} is empty"):
        compress(tiny_llama, tiny_oats_config(str(folder)), tokenizer, progress=False)
    (folder / "notes.txt").write_text("some text")
    with pytest.raises(CalibrationDataError, match=f"{re.escape(str(folder))} is not a dataset saved by"):
        compress(tiny_llama, tiny_oats_config(str(folder)), tokenizer, progress=False)


@pytest.mark.parametrize(
    "content", ["\x00" * 4096, "\x00\x01\x02\n\n\x1b\x7f\n\n\u200b\ufeff\x0c"], ids=["nul", "mixed"]
)
def test_calibration_text_of_control_characters_is_an_error(content, tiny_llama, tokenizer, tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=f"'{re.escape(str(path))}' holds no real text, only control"):
        compress(tiny_llama, tiny_oats_config(str(path)), tokenizer, progress=False)
    assert not _compressed(tiny_llama)


def test_documents_of_control_characters_are_left_out(caplog):
    from optimum_oats.data.text import load_calibration_texts

    with caplog.at_level(logging.WARNING, logger="optimum_oats"):
        assert load_calibration_texts(["\x00\x00", "real text\x00"]) == ["real text\x00"]
    assert "1 calibration documents hold only control characters" in caplog.text
