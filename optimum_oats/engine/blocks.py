"""Where a model's repeated blocks and their linear layers are, and refusing what cannot be compressed.

Blocks are found generically (`_no_split_modules`, else the longest list of same-class modules), never through a
hard-coded attribute path: one stack for decoder LMs and encoders, two for encoder-decoders.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Linear-like modules the engine refuses rather than skipping silently.
_UNSUPPORTED_PROJECTIONS = ("Conv1D",)


class UnsupportedArchitectureError(NotImplementedError):
    """The model's structure is outside what the calibration engine can compress faithfully."""


def _block_lists(model: nn.Module) -> list[tuple[bool, int, str, nn.ModuleList]]:
    """Every non-empty `nn.ModuleList` of same-class modules: `(class in _no_split_modules, length, name, list)`."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(child).__name__ for child in module}
            if len(classes) == 1:
                candidates.append((classes <= no_split, len(module), name, module))
    if not candidates:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no list of repeated blocks (an `nn.ModuleList` of transformer layers), "
            "so it cannot be compressed block by block. Supported: decoder LMs (Llama, Mistral, Qwen2/3, "
            "Gemma 2/3, Phi-3, OPT), encoders (BERT, RoBERTa, DeBERTa-v2, ViT, DINOv2) and encoder-decoders "
            "(BART, T5)."
        )
    return candidates


def find_block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of repeated blocks, in module order: `[(name, blocks)]`.

    The stacks are the `nn.ModuleList`s whose block class is in `_no_split_modules` (the classes transformers
    never splits across devices), leaving out lists nested in another one: one stack for decoder LMs and
    encoders, two for encoder-decoders (`model.encoder.layers`, `model.decoder.layers`). Models that declare no
    such class fall back to their longest list of same-class modules.
    """
    candidates = _block_lists(model)
    preferred = [(name, blocks) for in_no_split, _, name, blocks in candidates if in_no_split]
    if not preferred:
        _, _, name, blocks = max(candidates, key=lambda c: c[1])
        return [(name, blocks)]
    names = [name for name, _ in preferred]
    return [
        (name, blocks)
        for name, blocks in preferred
        if not any(name != outer and name.startswith(outer + ".") for outer in names)
    ]


def find_main_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The main stack of repeated blocks (the longest, preferring `_no_split_modules` classes): the decoder of a
    decoder LM, the encoder of an encoder; [`find_block_stacks`] returns every stack (encoder-decoders have two).
    """
    _, _, name, blocks = max(_block_lists(model), key=lambda c: (c[0], c[1]))
    return name, blocks


def find_linear_layers(block: nn.Module, prefix: str, skip: Any = None) -> dict[str, nn.Linear]:
    """All `nn.Linear` modules of a block by full name, refusing projections this engine cannot compress."""
    linears: dict[str, nn.Linear] = {}
    for name, module in block.named_modules():
        full_name = f"{prefix}.{name}" if name else prefix
        if type(module).__name__ in _UNSUPPORTED_PROJECTIONS:
            raise UnsupportedArchitectureError(
                f"`{full_name}` is a {type(module).__name__} (GPT-2 style transposed linear), which is not "
                "supported yet. Supported blocks use `nn.Linear` projections "
                "(Llama, Mistral, Qwen, Gemma, Phi-3, OPT, BERT, DeBERTa-v2, BART, T5, ViT)."
            )
        if isinstance(module, nn.Linear):
            if skip is None or not skip(full_name):
                linears[full_name] = module
        elif not any(True for _ in module.children()):
            for param_name, param in module.named_parameters(recurse=False):
                if param.dim() == 3:
                    raise UnsupportedArchitectureError(
                        f"`{full_name}.{param_name}` is a 3-D expert weight (fused mixture-of-experts), which is "
                        "not supported yet; only `nn.Linear` projections are compressed."
                    )
    return linears


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule `name` (dotted path) of `root` by `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
