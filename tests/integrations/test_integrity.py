"""Damaged checkpoints never load silently wrong: structural checks of every bitmask (always on), the integrity
records written at save and checked at load, and a checkpoint saved before the records existed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_oats  # noqa: F401  (registers the "oats" method)
from optimum_oats.integrations.checkpoint import CheckpointError
from tests.helpers.integrity_models import IDS, compressed_tiny_llama

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
UNRECORDED = FIXTURES / "unrecorded_d6939ad_llama"  # saved by d6939ad, before the integrity records


@pytest.fixture(scope="module")
def nm_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nm") / "checkpoint"
    compressed_tiny_llama(sparsity_pattern="2:4", rank_ratio=0.05).save_pretrained(path)
    return path


def _damaged_copy(source: Path, target: Path, key: str, edit) -> Path:
    """`source` copied to `target` with tensor `key` edited in place by `edit(tensor)` (records, if any, dropped)."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    tensors[key] = tensors[key].clone()
    edit(tensors[key])
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _set_bits(byte: int) -> list[int]:
    return [bit for bit in range(8) if byte >> bit & 1]


def _move_bit_to_next_row(mask: torch.Tensor) -> None:
    """Clear a kept bit of row 0 and set a free one in row 1 (same total)."""
    col = next(c for c in range(mask.shape[1]) if int(mask[0, c]) and int(mask[1, c]) != 0xFF)
    bit = _set_bits(int(mask[0, col]))[0]
    mask[0, col] ^= 1 << bit
    free = next(b for b in range(8) if not int(mask[1, col]) >> b & 1)
    mask[1, col] ^= 1 << free


def _move_bit_into_padding(mask: torch.Tensor) -> None:
    """In `down_proj` (100 inputs: 4 padding bits per row), clear a kept bit of the last byte, set a padding bit."""
    last = int(mask[0, -1])
    kept = _set_bits(last & 0x0F)
    if not kept:  # make one kept bit of the last byte by taking it from an earlier byte of the row
        col = next(c for c in range(mask.shape[1] - 1) if int(mask[0, c]))
        mask[0, col] ^= 1 << _set_bits(int(mask[0, col]))[0]
    else:
        mask[0, -1] ^= 1 << kept[0]
    mask[0, -1] |= 1 << 7


def test_checkpoint_without_records_loads_with_its_logits():
    expected = torch.load(FIXTURES / "unrecorded_d6939ad_llama_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(UNRECORDED)
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], rtol=1e-4, atol=1e-5)


def test_bit_moved_to_another_row_is_named(tmp_path):
    key = "model.layers.1.mlp.gate_proj.weight_mask"
    broken = _damaged_copy(UNRECORDED, tmp_path / "broken", key, _move_bit_to_next_row)
    with pytest.raises(CheckpointError, match=rf"`{key}` keeps 29 weights in row 0 but every row .* keeps 30"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_unequal_row_counts_are_refused_on_the_legacy_fixture(tmp_path):
    key = "model.layers.0.self_attn.q_proj.weight_mask"
    legacy = FIXTURES / "legacy_b3d9cb0_llama"
    broken = _damaged_copy(legacy, tmp_path / "broken", key, _move_bit_to_next_row)
    with pytest.raises(CheckpointError, match=rf"`{key}` keeps \d+ weights in row 0 but every row"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_bit_moved_into_the_padding_is_named(tmp_path):
    key = "model.layers.0.mlp.down_proj.weight_mask"
    broken = _damaged_copy(UNRECORDED, tmp_path / "broken", key, _move_bit_into_padding)
    with pytest.raises(CheckpointError, match=rf"`{key}` has bits set past column 100 \(the padding of row 0\)"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_nm_group_over_its_quota_is_named(nm_checkpoint, tmp_path):
    key = "model.layers.0.mlp.up_proj.weight_mask"

    def crowd_one_group(mask):  # row 0: move a kept bit of byte 1 into a full group of byte 0 (row total kept)
        byte = int(mask[0, 0])
        free = next(b for b in range(4) if not byte >> b & 1)
        mask[0, 0] |= 1 << free
        mask[0, 1] ^= 1 << _set_bits(int(mask[0, 1]))[0]

    model = AutoModelForCausalLM.from_pretrained(nm_checkpoint)
    assert model.config.quantization_config.sparsity_pattern == "2:4"
    broken = _damaged_copy(nm_checkpoint, tmp_path / "broken", key, crowd_one_group)
    with pytest.raises(CheckpointError, match=rf"`{key}` keeps 3 weights in columns 0-3 of row 0, more than the 2:4"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_sound_checkpoints_pass_the_structural_checks(nm_checkpoint):
    for path in (UNRECORDED, nm_checkpoint, FIXTURES / "legacy_b3d9cb0_llama"):
        model = AutoModelForCausalLM.from_pretrained(path)
        with torch.no_grad():
            assert torch.isfinite(model(IDS).logits).all()
