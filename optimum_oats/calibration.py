"""Sequential, block-by-block calibration: find the blocks, capture their inputs, hook their linear layers.

The model is never run end to end after the first capture: each block sees the outputs of the already
compressed blocks before it (as in SparseGPT, Wanda and OATS), and only one block's statistics are alive at
a time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .algorithms import HESSIAN, INPUT_NORMS
from .hessian import HessianAccumulator

logger = logging.getLogger(__name__)

# Linear-like modules the engine refuses rather than skipping silently.
_UNSUPPORTED_PROJECTIONS = ("Conv1D",)


class UnsupportedArchitectureError(NotImplementedError):
    """The model's structure is outside what the calibration engine can compress faithfully."""


@dataclass
class BlockInputs:
    """What the blocks receive: each calibration sample's hidden states at the first block, and the keyword
    arguments the model passes to *each* block.

    Keyword arguments differ between blocks in some architectures (Gemma 2/3, Qwen with sliding layers: a
    sliding-window or full mask and local or global rotary embeddings per layer), so they are recorded per block.
    They do not depend on the hidden states, and every calibration window has the same length, so one forward
    pass of one sample records them for all samples.
    """

    hidden_states: list[torch.Tensor] = field(default_factory=list)
    block_kwargs: list[dict[str, Any]] = field(default_factory=list)


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the first block needs to run."""


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Locate the repeated blocks through `_no_split_modules` (the classes transformers never splits).

    Falls back to the longest `nn.ModuleList` of same-class modules.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(child).__name__ for child in module}
            if len(classes) == 1:
                candidates.append((classes <= no_split, len(module), name, module))
    if not candidates:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no list of repeated blocks (an `nn.ModuleList` of decoder layers), "
            "so it cannot be compressed block by block. Supported: decoder LMs such as Llama, Mistral, Qwen2/3, "
            "Gemma 2/3, Phi-3 and OPT."
        )
    _, _, name, blocks = max(candidates, key=lambda c: (c[0], c[1]))
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
                "(Llama, Mistral, Qwen, Gemma, Phi-3, OPT)."
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


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, progress: bool = False
) -> BlockInputs:
    """Record the first block's input for every calibration sample, and every block's keyword arguments.

    Samples stop at the first block (a forward pre-hook raises), so only the embeddings run for them; one extra
    full forward of the first sample records what the model passes to each block.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    captured = BlockInputs(block_kwargs=[None] * len(blocks))

    def record_kwargs(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.block_kwargs[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return hook

    handles = [block.register_forward_pre_hook(record_kwargs(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        model(input_ids[:1].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(kwargs is None for kwargs in captured.block_kwargs):
        raise UnsupportedArchitectureError(
            f"Not every block of {type(model).__name__} was reached by the forward pass; "
            "the block structure is not the one this engine expects."
        )

    def stop(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.hidden_states.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for sample in tqdm(input_ids, desc="Capturing block inputs", disable=not progress, leave=False):
            try:
                model(sample.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def block_forward(block: nn.Module, hidden_states: list[torch.Tensor], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Run every sample through one block with that block's keyword arguments; returns the outputs."""
    outputs = []
    for hidden in hidden_states:
        out = block(hidden, **kwargs)
        outputs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return outputs


class InputNormAccumulator:
    """Accumulates `sum_t x_tj^2` per input feature; `finalize()` gives `||X_j||_2` (Wanda/OATS's D)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum_squares = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum_squares += flat.square().sum(dim=0).double()
        self.tokens += flat.shape[0]

    def finalize(self) -> torch.Tensor:
        return self.sum_squares.sqrt().float()


STATISTICS = {INPUT_NORMS: InputNormAccumulator, HESSIAN: HessianAccumulator}


@contextmanager
def collect_statistics(linears: dict[str, nn.Linear], needed: tuple[str, ...]) -> Iterator[dict[str, dict]]:
    """Hook `linears` while the block runs; yields `{layer: {statistic: accumulator}}`."""
    accumulators: dict[str, dict] = {
        name: {stat: STATISTICS[stat](layer.in_features, layer.weight.device) for stat in needed}
        for name, layer in linears.items()
    }
    handles = []
    for name, layer in linears.items():
        if not needed:
            continue

        def hook(_module: nn.Module, args: tuple, _output: Any, name: str = name) -> None:
            for accumulator in accumulators[name].values():
                accumulator.update(args[0])

        handles.append(layer.register_forward_hook(hook))
    try:
        yield accumulators
    finally:
        for handle in handles:
            handle.remove()
