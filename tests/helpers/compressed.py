"""A tiny Llama whose block linears are `LinearSparseLowRank` (uneven random masks, random low-rank factors): what
a compressed checkpoint holds, built in milliseconds without running a compression method."""

from __future__ import annotations

import torch
from torch import nn

from optimum_oats import OATSConfig
from optimum_oats.algorithms.quantize import quantize_rtn
from optimum_oats.nn import LinearSparseLowRank
from optimum_oats.utils.quantization import NOT_QUANTIZED, GroupSpec


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


def quantized_layer(
    out_features: int,
    in_features: int,
    *,
    value_bits: int = 4,
    group_size: int = 128,
    rank: int = 3,
    lowrank_bits: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LinearSparseLowRank:
    """A quantized layer as compression writes it: uneven random rows (empty to full), values rounded to nearest on
    their grid (`quantize_rtn`), U V too unless `lowrank_bits` is 16."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator))
    density = torch.rand(out_features, 1, generator=generator)
    keep = torch.rand(out_features, in_features, generator=generator) < density
    sparse, value_scales = quantize_rtn(linear.weight.detach() * keep, GroupSpec(value_bits, group_size))
    u = torch.randn(out_features, rank, generator=generator) * 0.1 if rank else None
    v = torch.randn(rank, in_features, generator=generator) * 0.1 if rank else None
    scales = [value_scales, None, None]
    if rank and lowrank_bits < NOT_QUANTIZED:
        spec = GroupSpec(lowrank_bits, group_size, zero_level=True)
        (u, scales[1]), (v, scales[2]) = quantize_rtn(u, spec), quantize_rtn(v, spec)
    storage = {"value_bits": value_bits, "lowrank_bits": lowrank_bits, "group_size": group_size}
    return LinearSparseLowRank.from_linear(linear.to(dtype), sparse, u, v, scales=tuple(scales), **storage).eval()


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


def tiny_oats_config(texts: list[str], **kwargs) -> OATSConfig:
    """The fastest config that still runs every stage on a tiny model: 2 windows of 32 tokens, 2 OATS iterations."""
    return OATSConfig(**{"dataset": texts, "num_samples": 2, "seqlen": 32, "num_iterations": 2, **kwargs})
