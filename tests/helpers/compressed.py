"""A tiny Llama whose block linears are `LinearSparseLowRank` (uneven random masks, random low-rank factors): what
a compressed checkpoint holds, built in milliseconds without running a compression method."""

from __future__ import annotations

import torch
from torch import nn

from optimum_oats.nn import LinearSparseLowRank


def compress_randomly(model: nn.Module, rank: int = 4, seed: int = 0) -> int:
    """Replace every linear inside the decoder blocks; returns how many were replaced."""
    generator = torch.Generator().manual_seed(seed)
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".layers." in name]
    for name in names:
        linear = model.get_submodule(name)
        d_out, d_in = linear.weight.shape
        density = torch.rand(d_out, 1, generator=generator)  # uneven rows, from empty to full
        keep = torch.rand(d_out, d_in, generator=generator) < density
        sparse = linear.weight.detach() * keep
        u = torch.randn(d_out, rank, generator=generator) * 0.05
        v = torch.randn(rank, d_in, generator=generator) * 0.05
        model.set_submodule(name, LinearSparseLowRank.from_linear(linear, sparse, u, v))
    return len(names)


def tiny_compressed_llama(
    dtype: torch.dtype = torch.float32, vocab_size: int = 128, layers: int = 2, seed: int = 0
) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.helpers.tiny_models import TINY

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, "num_hidden_layers": layers}, vocab_size=vocab_size)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert compress_randomly(model, seed=seed) == layers * 7
    return model.to(dtype).requires_grad_(False)
