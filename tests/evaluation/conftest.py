"""Fixtures for the evaluation tests: the offline data folder, the real SmolLM2-135M, and a tiny random model.

The data folder comes from `OATS_DATA_DIR`, defaulting to `<repo>/../shared/data`. When it is missing the tests
fail (they never skip): in CI the data must be there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"

# Files the evaluation layer reads; a folder without them is not the data folder.
REQUIRED_FILES = (
    "wikitext2/wiki.test.raw",
    "wikitext2/wiki.valid.raw",
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
    """The offline evaluation data folder (`$OATS_DATA_DIR`, default `<repo>/../shared/data`)."""
    path = Path(os.environ.get("OATS_DATA_DIR") or DEFAULT_DATA_DIR).resolve()  # absolute: CLI tests run elsewhere
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    assert not missing, (
        f"Evaluation data not found in {path} (missing: {', '.join(missing)}). Set OATS_DATA_DIR to the shared "
        "data folder described in shared/data/README.md."
    )
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct as a Hugging Face folder."""
    from optimum_oats.integrations.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """SmolLM2-135M-Instruct in float32, eval mode, on CPU."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_lm(smollm2_tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer: for tests that only check plumbing."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()
