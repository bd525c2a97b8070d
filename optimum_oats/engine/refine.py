"""Block refinement: after a block is compressed, a few optimiser steps on the kept values of S and on U, V (masks
fixed) so that the compressed block's outputs match the dense block's on the calibration inputs.

This is the "transformer matching" step of 3BASiL (Makni et al., NeurIPS 2025) and Wanda++'s block reconstruction,
applied to any method's result. When the refined block is not better on its calibration data than the start, the
start is kept, so refinement never raises the block's calibration loss.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..nn import LinearSparseLowRank
from .capture import SampleCall, replay_sample, sample_calls

logger = logging.getLogger(__name__)

# `OATSConfig.refine_lr` left unset: Adam's rate by the block's compression rate. Measured on SmolLM2-135M
# (docs/quality.md, sweep protocol, 64 steps): 1e-3 beat 1e-4 for SparseGPT and hassle at ρ = 0.6 and 0.7; at 0.3 it
# was worse for both (for hassle every block's refinement was undone), at 0.5 it helped SparseGPT only.
AUTO_REFINE_LR = 1e-4
AUTO_REFINE_LR_HIGH_RATE = 1e-3
AUTO_REFINE_LR_FROM_RATE = 0.55


def default_refine_lr(compression_rate: float) -> float:
    """The refinement rate a block compressed at `compression_rate` gets when none is configured: the far larger
    errors of high compression need larger steps; near the dense block they overshoot."""
    return AUTO_REFINE_LR_HIGH_RATE if compression_rate >= AUTO_REFINE_LR_FROM_RATE else AUTO_REFINE_LR


def block_compression_rate(layers: dict[str, LinearSparseLowRank]) -> float:
    """The fraction of the block's linear parameters that compression removed (whatever the method or pattern)."""
    dense = sum(layer.in_features * layer.out_features for layer in layers.values())
    return 1.0 - sum(layer.num_parameters for layer in layers.values()) / max(dense, 1)


def block_loss(
    block: nn.Module, hidden_states: list[torch.Tensor], calls: list[SampleCall], targets: list[torch.Tensor]
) -> float:
    """Mean squared error of the block's outputs against `targets`, averaged over samples (float64)."""
    with torch.no_grad():
        losses = [
            (replay_sample(block, h, c).float() - t.float()).square().mean().double()
            for h, c, t in zip(hidden_states, calls, targets, strict=True)
        ]
    return float(torch.stack(losses).mean())


def refine_block(
    block: nn.Module,
    layers: dict[str, LinearSparseLowRank],
    hidden_states: list[torch.Tensor],
    kwargs: dict[str, Any] | list[SampleCall],
    targets: list[torch.Tensor],
    *,
    steps: int,
    lr: float | None = None,
    lowrank_lr: float | None = None,
    progress: bool = False,
) -> tuple[float, float]:
    """Fit the compact layers of `block` to the dense block's outputs `targets`; returns `(loss before, after)`.

    One Adam step per calibration sample (cycled in a fixed order), on every compact layer's kept values, U and V;
    the rest of the block is frozen for the duration. Masks never change, so the result has the same shapes.
    `lr` None: [`default_refine_lr`] of the block's compression rate. `lowrank_lr` (default: `lr`) is U and V's own
    rate: their product moves by about the sum of both steps, so at a rate that suits the kept values it can
    overshoot (`benchmarks/refine_block.py` measures it). When `after` equals `before` the refinement was undone.
    """
    from tqdm.auto import tqdm

    if lr is None:
        lr = default_refine_lr(block_compression_rate(layers))
    calls = sample_calls(kwargs, len(hidden_states))
    values = [layer.weight for layer in layers.values() if layer.weight.numel()]
    lowrank = [p for layer in layers.values() for p in (layer.lowrank_u, layer.lowrank_v) if p.numel()]
    trained = values + lowrank
    before = block_loss(block, hidden_states, calls, targets)
    if steps <= 0 or not trained:
        return before, before
    best = [p.detach().clone() for p in trained]
    frozen = {p: p.requires_grad for p in block.parameters()}
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    groups = [{"params": values, "lr": lr}, {"params": lowrank, "lr": lr if lowrank_lr is None else lowrank_lr}]
    optimizer = torch.optim.Adam([group for group in groups if group["params"]])
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), desc="Refining block", disable=not progress, leave=False):
                index = step % len(hidden_states)
                output = replay_sample(block, hidden_states[index], calls[index])
                loss = (output.float() - targets[index].float()).square().mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for parameter, requires_grad in frozen.items():
            parameter.requires_grad_(requires_grad)
        for layer in layers.values():
            layer.release_caches()
    after = block_loss(block, hidden_states, calls, targets)
    if not after < before:  # keep the start: refinement must never make the block worse on its own data
        with torch.no_grad():
            for parameter, saved in zip(trained, best, strict=True):
                parameter.copy_(saved)
        for layer in layers.values():  # a dense cache built from the discarded values must not survive them
            layer.release_caches()
        after = before
    logger.debug("Block refinement: calibration loss %.6g -> %.6g", before, after)
    return before, after
