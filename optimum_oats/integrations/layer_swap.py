"""Swapping layers in and out: empty compact layers before a checkpoint loads, dense layers on `dequantize()`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from ..config import OATSConfig
from ..engine.blocks import set_module
from ..engine.embeddings import dequantize_embeddings
from ..nn import LinearSparseLowRank

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def replace_with_skeletons(model: PreTrainedModel, config: OATSConfig) -> dict[str, tuple[int, int]]:
    """Swap each layer named in `config.layer_map` for an empty `LinearSparseLowRank` of the recorded shape.

    Runs before weights load (on the meta device under `from_pretrained`), so the checkpoint's compact
    tensors land directly in the right places. Returns `{module: (in_features, out_features)}`.
    """
    if not config.layer_map:
        raise ValueError(
            "This checkpoint's `quantization_config` has no `layer_map`, so its compressed layers cannot be "
            "rebuilt. It was not written by `optimum_oats` (or was edited); re-run the compression."
        )
    modules = dict(model.named_modules())
    shapes = {}
    for name, entry in config.layer_map.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"The checkpoint's `layer_map` names `{name}`, which is not a linear layer of "
                f"{type(model).__name__} (found {type(linear).__name__ if linear is not None else 'nothing'}). "
                "The checkpoint and its config.json disagree."
            )
        storage = {key: entry[key] for key in ("value_bits", "lowrank_bits", "group_size") if key in entry}
        skeleton = LinearSparseLowRank.skeleton_of(linear, entry["rank"], entry["nnz"], **storage)
        set_module(model, name, skeleton)
        shapes[name] = (linear.in_features, linear.out_features)
    return shapes


def checkpoint_key_renamer(model: PreTrainedModel):
    """`key on disk -> parameter name` as transformers renames checkpoint keys while loading `model`.

    transformers 5 renames some architectures' modules and converts keys both ways (ViT stores
    `attention.attention.key` but its module is `attention.k_proj`), so a check of the checkpoint's tensors
    against `layer_map` (module names) must rename the stored keys first. Identity when nothing is renamed.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers without key conversion: keys are stored as named
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    if not transforms:
        return lambda key: key
    return lambda key: rename_source_key(key, renamings, converters)[0]


def replace_with_dense(model: PreTrainedModel) -> PreTrainedModel:
    """Merge every `LinearSparseLowRank` back to a dense `nn.Linear` (`S + U V`), and an int8 embedding (with its
    tied head) back to floats."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearSparseLowRank):
            set_module(model, name, module.to_linear())
    dequantize_embeddings(model)
    return model
