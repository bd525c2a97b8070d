"""Swapping the token embedding (and the LM head tied to it) for int8 rows, `OATSConfig(embedding_bits=8)`.

Runs after the blocks are compressed (calibration reads the dense embedding), and again on the weightless skeleton
before a compressed checkpoint loads. Only a head *tied* to the embedding is supported: it reads the embedding's codes,
so the table is stored once. The model's config then records `tie_word_embeddings=False`, because transformers' own
tying would look for `lm_head.weight`; the tie is held by [`TiedQuantizedHead`] instead.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algorithms.quantize import quantize_rows_int8
from ..config import OATSConfig
from ..nn.quantized_embedding import QuantizedEmbedding, TiedQuantizedHead


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _ties_embeddings(model: nn.Module) -> bool:
    return bool(getattr(_text_config(model), "tie_word_embeddings", False))


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def check_embedding_plan(model: nn.Module, config: OATSConfig) -> None:
    """Refuse `embedding_bits=8` where the embedding is not an `nn.Embedding` or the LM head is not tied to it."""
    if config.embedding_bits == 16:
        return
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    # Exactly `nn.Embedding`: a subclass may change the lookup (Gemma 3 scales it by sqrt(hidden) in its forward),
    # which a swapped-in table would silently drop.
    if type(embedding) is not nn.Embedding:
        raise ValueError(
            f"`embedding_bits={config.embedding_bits}` needs a model whose `get_input_embeddings()` is a plain "
            f"`nn.Embedding`; {type(model).__name__} has {type(embedding).__name__}. Leave `embedding_bits=16`."
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not _ties_embeddings(model):
        raise ValueError(
            f"`embedding_bits={config.embedding_bits}` supports models whose LM head is tied to the token embedding "
            f"(`tie_word_embeddings=True`, e.g. SmolLM2, Llama-3.2-1B, Qwen2.5-0.5B); {type(model).__name__} has an "
            "untied head. Leave `embedding_bits=16`."
        )


def _untie(model: nn.Module, embedding: QuantizedEmbedding) -> None:
    model.set_input_embeddings(embedding)
    if model.get_output_embeddings() is not None:
        model.set_output_embeddings(TiedQuantizedHead(embedding))
        _text_config(model).tie_word_embeddings = False
        model.config.tie_word_embeddings = False
        if hasattr(model, "all_tied_weights_keys"):
            model.all_tied_weights_keys = {}


@torch.no_grad()
def quantize_embeddings(model: nn.Module) -> QuantizedEmbedding:
    """Replace the token embedding by its int8 rows (and a tied LM head by a head reading them); returns the layer."""
    embedding = model.get_input_embeddings()
    codes, scales = quantize_rows_int8(embedding.weight)
    quantized = QuantizedEmbedding.from_codes(codes, scales, embedding.weight.dtype, embedding.padding_idx)
    _untie(model, quantized)
    return quantized


def embedding_skeletons(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Swap in empty int8 layers before a checkpoint loads; returns the shape of each tensor it must hold."""
    skeleton = QuantizedEmbedding.skeleton_of(model.get_input_embeddings())
    _untie(model, skeleton)
    name = _module_name(model, skeleton)
    return {f"{name}.{key}": tuple(tensor.shape) for key, tensor in skeleton.state_dict().items()}


def dequantize_embeddings(model: nn.Module) -> None:
    """Back to a float `nn.Embedding`, and a tied `nn.Linear` head when there was one (for `dequantize()`)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, QuantizedEmbedding):
        return
    dense = embedding.to_embedding()
    model.set_input_embeddings(dense)
    if isinstance(model.get_output_embeddings(), TiedQuantizedHead):
        head = nn.Linear(dense.embedding_dim, dense.num_embeddings, bias=False, device=dense.weight.device)
        head.weight = dense.weight
        model.set_output_embeddings(head)
        _text_config(model).tie_word_embeddings = True
        model.config.tie_word_embeddings = True
        if hasattr(model, "get_expanded_tied_weights_keys"):
            model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
