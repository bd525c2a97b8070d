"""Shared fixtures: tiny random models of several architectures, the real SmolLM2-135M, and the data folder.

Tests that need the data folder or the SmolLM2 wheel fail (never skip) when they are missing: in CI they
must be there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import optimum_oats  # noqa: F401  (registers the "oats" method)
from tests.helpers.tiny_models import _tiny_configs, build_tiny_model

pytest_plugins = ["tests.helpers.hub_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("OATS_DATA_DIR", DEFAULT_DATA_DIR)).resolve()  # absolute: CLI tests run elsewhere
    assert (path / "wikitext2" / "wiki.test.raw").is_file(), (
        f"Evaluation data not found at {path}. Set OATS_DATA_DIR to the shared data folder (see README)."
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
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def tiny_configs(tokenizer) -> dict:
    return _tiny_configs(len(tokenizer))


@pytest.fixture
def tiny_llama(tiny_configs):
    return build_tiny_model(tiny_configs["llama"])


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory, tiny_configs, tokenizer) -> Path:
    """A tiny random Llama saved with the SmolLM2 tokenizer: a dense checkpoint folder to compress."""
    path = tmp_path_factory.mktemp("dense")
    build_tiny_model(tiny_configs["llama"]).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
