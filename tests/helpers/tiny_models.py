"""Tiny random models of each supported architecture, built from configs for fast unit tests."""

from __future__ import annotations

import copy

import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# SmolLM2's vocabulary size: the tiny models keep the shapes their tests were tuned on (Phi-3's default pad id 32000
# fits), and the tiny tokenizer (tests/helpers/tiny_tokenizer.py) uses the first 1024 ids.
TINY_VOCAB = 49152


def _tiny_configs(vocab_size: int = TINY_VOCAB) -> dict:
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(TINY, vocab_size=vocab_size)
    return {
        "llama": LlamaConfig(**common),
        "mistral": MistralConfig(**common),
        "qwen2": Qwen2Config(**common),
        "qwen3": Qwen3Config(**common, head_dim=16),
        "gemma2": Gemma2Config(**common, head_dim=16),
        "gemma3": Gemma3TextConfig(**common, head_dim=16),
        "phi3": Phi3Config(**common),
        "opt": OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=vocab_size,
            word_embed_proj_dim=64,
            max_position_embeddings=512,
        ),
    }


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "opt"]


def build_tiny_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config)).eval()
