"""Issue 33, item 5: weak messages and silent acceptances. Each case names the file or setting in its message, and
every test here failed on the code before the fix."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_oats import OATSConfig, compress
from optimum_oats.engine.report import REPORT_FILE
from tests.helpers.tiny_models import build_tiny_model

IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])


def _cfg(texts, **kwargs) -> OATSConfig:
    return OATSConfig(**{"dataset": texts, "num_samples": 2, "seqlen": 32, "num_iterations": 2, **kwargs})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_configs, tokenizer, calibration_texts) -> Path:
    """A compressed tiny Llama saved by `save_pretrained` (never modified: tests copy it)."""
    model = compress(build_tiny_model(tiny_configs["llama"]), _cfg(calibration_texts[:100]), tokenizer, progress=False)
    path = tmp_path_factory.mktemp("messages") / "checkpoint"
    model.save_pretrained(path)
    return path


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
