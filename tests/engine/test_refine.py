"""Block refinement: it lowers the compressed block's calibration loss, and never raises it."""

from __future__ import annotations

import torch

from optimum_oats import OATSConfig
from optimum_oats.algorithms import INPUT_NORMS
from optimum_oats.engine.blocks import find_linear_layers, find_main_block_stack, set_module
from optimum_oats.engine.capture import block_forward, capture_block_inputs
from optimum_oats.engine.layers import compress_block
from optimum_oats.engine.loop import compress_with_inputs
from optimum_oats.engine.refine import block_compression_rate, block_loss, default_refine_lr, refine_block
from optimum_oats.engine.statistics import collect_statistics
from optimum_oats.nn import LinearSparseLowRank
from tests.helpers.tiny_models import build_tiny_model

IDS = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(0))


def _compressed_block(tiny_configs, method="wanda"):
    model = build_tiny_model(tiny_configs["llama"])
    name, blocks = find_main_block_stack(model)
    inputs = capture_block_inputs(model, blocks, IDS)
    block, kwargs = blocks[0], inputs.block_kwargs[0]
    local = {n[len(name) + 3 :]: m for n, m in find_linear_layers(block, f"{name}.0").items()}
    with torch.no_grad(), collect_statistics(local, (INPUT_NORMS,)) as accumulators:
        targets = block_forward(block, inputs.hidden_states, kwargs)
    config = OATSConfig(method=method, compression_rate=0.7, num_iterations=5)
    compressed = compress_block(f"{name}.0", local, accumulators, config)
    layers = {}
    for layer_name, (layer, _) in compressed.items():
        set_module(block, layer_name, layer)
        layers[layer_name] = layer
    return block, layers, inputs.hidden_states, kwargs, targets


def _state(layers):
    parts = ("weight", "weight_mask", "lowrank_u", "lowrank_v")
    return {n: [getattr(layer, p).detach().clone() for p in parts] for n, layer in layers.items()}


def test_refinement_lowers_the_block_loss_and_keeps_the_masks(tiny_configs):
    block, layers, hidden, kwargs, targets = _compressed_block(tiny_configs, "oats")
    masks = {n: layer.weight_mask.clone() for n, layer in layers.items()}
    before, after = refine_block(block, layers, hidden, kwargs, targets, steps=40, lr=1e-3)
    assert after < before
    assert after == block_loss(block, hidden, _calls(kwargs, hidden), targets)
    assert all(torch.equal(masks[n], layer.weight_mask) for n, layer in layers.items())


def _calls(kwargs, hidden):
    from optimum_oats.engine.capture import sample_calls

    return sample_calls(kwargs, len(hidden))


def test_refinement_never_raises_the_loss(tiny_configs):
    """A learning rate that wrecks the block: the start is kept, tensor for tensor."""
    block, layers, hidden, kwargs, targets = _compressed_block(tiny_configs)
    start = _state(layers)
    before, after = refine_block(block, layers, hidden, kwargs, targets, steps=8, lr=50.0)
    assert after == before == block_loss(block, hidden, _calls(kwargs, hidden), targets)
    end = _state(layers)
    assert all(torch.equal(a, b) for n in start for a, b in zip(start[n], end[n], strict=True))


def test_lowrank_lr_is_the_rate_of_u_and_v_alone(tiny_configs):
    """`lowrank_lr=0` trains the kept values and leaves U and V exactly where they were."""
    block, layers, hidden, kwargs, targets = _compressed_block(tiny_configs, "oats")
    ranked = [name for name, layer in layers.items() if layer.rank]
    assert ranked
    start = _state(layers)
    before, after = refine_block(block, layers, hidden, kwargs, targets, steps=40, lr=1e-3, lowrank_lr=0.0)
    assert after < before
    end = _state(layers)
    assert all(not torch.equal(start[name][0], end[name][0]) for name in layers)  # kept values moved
    for name in ranked:
        assert torch.equal(start[name][2], end[name][2]) and torch.equal(start[name][3], end[name][3])


def test_requires_grad_is_restored(tiny_configs):
    block, layers, hidden, kwargs, targets = _compressed_block(tiny_configs)
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    refine_block(block, layers, hidden, kwargs, targets, steps=3, lr=1e-4)
    assert {n: p.requires_grad for n, p in block.named_parameters()} == flags


def test_compress_with_refinement_keeps_the_shapes(tiny_configs):
    plain = build_tiny_model(tiny_configs["llama"])
    refined = build_tiny_model(tiny_configs["llama"])
    a = compress_with_inputs(plain, OATSConfig(method="wanda", compression_rate=0.6), IDS, progress=False)
    b = compress_with_inputs(
        refined, OATSConfig(method="wanda", compression_rate=0.6, refine_steps=8, refine_lr=1e-3), IDS, progress=False
    )
    assert {n: (e["rank"], e["nnz"]) for n, e in a.items()} == {n: (e["rank"], e["nnz"]) for n, e in b.items()}
    changed = [
        n
        for n, m in refined.named_modules()
        if isinstance(m, LinearSparseLowRank) and not torch.equal(m.weight, plain.get_submodule(n).weight)
    ]
    assert changed  # refinement moved the kept values


def test_config_refine_lowrank_lr_reaches_the_refinement(tiny_configs):
    """`OATSConfig.refine_lowrank_lr=0` freezes U and V in the engine's refinement while the kept values move."""
    settings = dict(method="oats", compression_rate=0.6, num_iterations=5, refine_steps=8, refine_lr=1e-3)
    plain = build_tiny_model(tiny_configs["llama"])
    frozen = build_tiny_model(tiny_configs["llama"])
    compress_with_inputs(plain, OATSConfig(**{**settings, "refine_steps": 0}), IDS, progress=False)
    compress_with_inputs(frozen, OATSConfig(**settings, refine_lowrank_lr=0.0), IDS, progress=False)
    # the first block only: later blocks are compressed from the refined blocks' outputs, so their start differs
    layers = {n: m for n, m in frozen.named_modules() if isinstance(m, LinearSparseLowRank) and ".0." in n}
    assert any(m.lowrank_u.numel() for m in layers.values())
    for name, layer in layers.items():
        start = plain.get_submodule(name)
        assert torch.equal(layer.lowrank_u, start.lowrank_u) and torch.equal(layer.lowrank_v, start.lowrank_v)
    assert any(not torch.equal(m.weight, plain.get_submodule(n).weight) for n, m in layers.items())


def test_an_unset_rate_follows_the_block_compression_rate(tiny_configs):
    """`lr=None` is `default_refine_lr` of the fraction the block's compression removed: here ρ = 0.7, so 1e-3."""
    assert default_refine_lr(0.3) == default_refine_lr(0.5) == 1e-4
    assert default_refine_lr(0.55) == default_refine_lr(0.7) == 1e-3
    block, layers, hidden, kwargs, targets = _compressed_block(tiny_configs)
    assert abs(block_compression_rate(layers) - 0.7) < 0.01
    start = _state(layers)
    auto = refine_block(block, layers, hidden, kwargs, targets, steps=6)
    assert auto[1] < auto[0]  # kept, not undone: the comparison below is between two refined blocks
    refined = _state(layers)
    for name, layer in layers.items():  # back to the start, then the explicit rate
        for part, saved in zip(("weight", "weight_mask", "lowrank_u", "lowrank_v"), start[name], strict=True):
            getattr(layer, part).data.copy_(saved)
    assert refine_block(block, layers, hidden, kwargs, targets, steps=6, lr=1e-3) == auto
    assert all(torch.equal(a, b) for n in refined for a, b in zip(refined[n], _state(layers)[n], strict=True))


def test_blocks_whose_refinement_was_undone_are_reported(tiny_configs, caplog):
    """A rate that wrecks every block: the compression still finishes, and the warning names the count and the fix."""
    model = build_tiny_model(tiny_configs["llama"])
    blocks = len(find_main_block_stack(model)[1])
    config = OATSConfig(method="wanda", compression_rate=0.6, refine_steps=4, refine_lr=0.5)
    with caplog.at_level("WARNING", logger="optimum_oats.engine.loop"):
        compress_with_inputs(model, config, IDS, progress=False)
    assert f"{blocks} of {blocks} blocks (refine_lr 0.5)" in caplog.text
    assert "lower `refine_lr`" in caplog.text
