import copy

import pytest
import torch
from torch import nn

from optimum_oats.engine.blocks import UnsupportedArchitectureError, find_linear_layers, find_main_block_stack
from optimum_oats.engine.capture import block_forward, capture_block_inputs
from tests.helpers.tiny_models import ARCHITECTURES, build_tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_finds_blocks_and_linears(arch, tiny_configs):
    model = build_tiny_model(tiny_configs[arch])
    name, blocks = find_main_block_stack(model)
    assert len(blocks) == 2 and name.endswith("layers")
    linears = find_linear_layers(blocks[0], f"{name}.0")
    expected = {n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    assert {k.split(".0.", 1)[1] for k in linears} == expected
    assert len(linears) >= 4


def test_captures_every_keyword_argument(tiny_configs):
    model = build_tiny_model(tiny_configs["llama"])
    _, blocks = find_main_block_stack(model)
    ids = torch.randint(0, 100, (3, 16))
    captured = capture_block_inputs(model, blocks, ids)
    assert len(captured.hidden_states) == 3 and captured.hidden_states[0].shape == (1, 16, 64)
    assert len(captured.block_kwargs) == 2 and "position_embeddings" in captured.block_kwargs[0]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_block_replay_matches_the_model_forward(arch, tiny_configs):
    """Replaying the blocks one by one from the captured inputs must reproduce the model's own last block output,
    including architectures whose blocks get different masks/rotary embeddings (Gemma 2/3 sliding layers)."""
    config = copy.deepcopy(tiny_configs[arch])
    if arch in ("gemma2", "gemma3"):
        config.sliding_window = 4  # shorter than the sequence, so local and global layers really differ
        config.num_hidden_layers = 2
        config.layer_types = ["sliding_attention", "full_attention"]
    model = build_tiny_model(config)
    name, blocks = find_main_block_stack(model)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    last = {}
    handle = blocks[-1].register_forward_hook(
        lambda m, a, out: last.__setitem__("out", out[0] if isinstance(out, tuple) else out)
    )
    expected = []
    with torch.no_grad():
        for sample in ids:
            model(sample[None], use_cache=False)
            expected.append(last["out"])
    handle.remove()
    with torch.no_grad():
        captured = capture_block_inputs(model, blocks, ids)
        hidden = captured.hidden_states
        for index, block in enumerate(blocks):
            hidden = block_forward(block, hidden, captured.block_kwargs[index])
    for got, want in zip(hidden, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_gpt2_conv1d_is_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100))
    name, blocks = find_main_block_stack(model)
    with pytest.raises(UnsupportedArchitectureError, match="Conv1D"):
        find_linear_layers(blocks[0], f"{name}.0")


def test_model_without_blocks_is_refused():
    with pytest.raises(UnsupportedArchitectureError, match="no list of repeated blocks"):
        find_main_block_stack(nn.Sequential(nn.Linear(2, 2)))


def test_fused_experts_are_refused():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(4, 8, 16))

    block = nn.Module()
    block.experts = Experts()
    with pytest.raises(UnsupportedArchitectureError, match="expert"):
        find_linear_layers(block, "model.layers.0")
