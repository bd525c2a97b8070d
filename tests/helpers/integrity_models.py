"""A tiny compressed Llama whose `down_proj` rows end in padding bits (100 inputs), calibrated with a word tokenizer
over a 128-token vocabulary, so its checkpoint is small enough to damage byte by byte.

Run as a script to write the fixture of a checkpoint saved without integrity records:
`PYTHONPATH=<checkout> python tests/helpers/integrity_models.py tests/fixtures/<name>`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

CONFIG = dict(
    hidden_size=64,
    intermediate_size=100,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)
IDS = torch.tensor([[1, 5, 99, 120, 7, 42, 100, 3]])


def _texts() -> list[str]:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(100)]
    return [" ".join(rng.choice(words) for _ in range(200)) for _ in range(4)]


class _WordTokenizer:
    """Whitespace words to ids below 128 (the calibration interface only)."""

    bos_token_id = None
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors=None, verbose=True):
        ids = [3 + int(word[1:]) if word[1:].isdigit() else 3 for word in text.split()]
        return {"input_ids": torch.tensor([ids])} if return_tensors == "pt" else {"input_ids": ids}


def compressed_tiny_llama(seed: int = 0, **settings):
    """A compressed tiny Llama (OATS by default; `settings` go to `OATSConfig`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from optimum_oats import OATSConfig, compress

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**CONFIG)).eval()
    config = OATSConfig(**{"dataset": _texts(), "num_samples": 2, "seqlen": 32, "num_iterations": 2, **settings})
    return compress(model, config, _WordTokenizer(), progress=False)


if __name__ == "__main__":
    target = Path(sys.argv[1])
    model = compressed_tiny_llama()
    model.save_pretrained(target)
    with torch.no_grad():
        torch.save({"input_ids": IDS, "logits": model(IDS).logits}, target.parent / f"{target.name}_logits.pt")
