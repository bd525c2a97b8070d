"""Refusals for models the engine would otherwise turn into a silently wrong result.

Each check raises before any layer is replaced (shared weights) or before the layer concerned is compressed
(non-finite weights), with a message naming the module and the fix.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

from .blocks import UnsupportedArchitectureError, find_linear_layers


class SharedWeightError(UnsupportedArchitectureError):
    """A linear layer to be compressed shares its weight tensor with another module (tied or reused weights)."""


def refuse_shared_weights(
    model: nn.Module, blocks_name: str, blocks: nn.ModuleList, skip: Callable[[str], bool] | None = None
) -> None:
    """Refuse when a linear layer to be compressed shares its `weight` Parameter with any other module.

    Compressing replaces each layer by its own `LinearSparseLowRank`. For a weight used in two places that would
    give two different approximations, untie them (the checkpoint and the memory grow) and, for a block that
    appears twice in the block list, compress the second use from the first's already compressed output. Tied
    embeddings (`tie_word_embeddings`) are not affected: embeddings and `lm_head` are never compressed.

    Raises:
        SharedWeightError: naming every module that holds the shared weight and how to keep them dense.
    """
    owners: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        owners[id(param)].append(name.rpartition(".")[0])
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}"
        for name, linear in find_linear_layers(block, prefix, skip=skip).items():
            holders = list(dict.fromkeys(owners[id(linear.weight)]))
            if len(holders) > 1:
                raise SharedWeightError(
                    f"`{name}.weight` is shared by {len(holders)} modules ({', '.join(f'`{h}`' for h in holders)}): "
                    "tied or reused weights cannot be compressed layer by layer without untying them. Keep them "
                    f"dense with `modules_to_not_convert={holders!r}`, or untie the weights before compressing."
                )


def check_finite_weight(name: str, weight: torch.Tensor) -> None:
    """Refuse a layer whose weight already holds NaN/Inf: every method would carry it into the compressed model."""
    if weight.device.type != "meta" and not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"`{name}.weight` holds {bad} NaN/Inf values, so the model is broken before compression. Load the "
            "checkpoint again (or in float32 if it overflowed in float16) and check it gives finite outputs."
        )
