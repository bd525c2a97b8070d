"""Damaged checkpoints never load silently wrong: structural checks of every bitmask (always on), the integrity
records written at save and checked at load, and a checkpoint saved before the records existed."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_oats  # noqa: F401  (registers the "oats" method)
from optimum_oats.integrations.checkpoint import CheckpointError, read_safetensors_header
from optimum_oats.integrations.integrity import VERIFY_ENV, CheckpointIntegrityError, read_record, write_records
from tests.commands.test_cli import OPTIMUM_CLI, _subprocess_env, last_json, run_cli
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


# ----------------------------------------------------------------------------------------------- integrity records
@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """The fixture saved again by today's code: the same tensors, now with integrity records."""
    path = tmp_path_factory.mktemp("recorded") / "checkpoint"
    AutoModelForCausalLM.from_pretrained(UNRECORDED).save_pretrained(path)
    return path


def _load_quietly(path: Path, **kwargs):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        hf_logging.enable_progress_bar()


def _edit_bytes_in_place(folder: Path, key: str, edit, file: str = "model.safetensors") -> None:
    """Edit tensor `key`'s bytes inside the file (header, records and every other byte untouched)."""
    path = folder / file
    header = read_safetensors_header(path)
    start = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    begin, end = header[key]["data_offsets"]
    raw = bytearray(path.read_bytes())
    tensor = torch.frombuffer(raw[start + begin : start + end], dtype=torch.uint8).clone()
    if header[key]["dtype"] == "U8":
        tensor = tensor.view(*header[key]["shape"])
    edit(tensor)
    raw[start + begin : start + end] = tensor.flatten().numpy().tobytes()
    path.write_bytes(bytes(raw))


def _invert_byte_with_four_bits(mask):
    row, col = next(
        (r, c) for r in range(mask.shape[0]) for c in range(mask.shape[1]) if bin(int(mask[r, c])).count("1") == 4
    )
    mask[row, col] ^= 0xFF


def _move_bit_within_byte(mask):
    col = next(c for c in range(mask.shape[1]) if 0 < int(mask[0, c]) < 0xFF)
    byte = int(mask[0, col])
    mask[0, col] = byte ^ (1 << _set_bits(byte)[0]) ^ (1 << next(b for b in range(8) if not byte >> b & 1))


def _flip_value_byte(raw):
    raw[3] ^= 0x40  # the high byte (sign and exponent) of the first float32 value


MASK = "model.layers.1.mlp.gate_proj.weight_mask"
VALUES = "model.layers.1.mlp.gate_proj.weight"
TOTAL_PRESERVING_AND_VALUE_DAMAGE = [
    (MASK, _invert_byte_with_four_bits),
    (MASK, _move_bit_within_byte),
    (MASK, _move_bit_to_next_row),
    (VALUES, _flip_value_byte),
]


def test_records_describe_every_tensor_as_stored(recorded):
    path = recorded / "model.safetensors"
    header, record = read_safetensors_header(path), read_record(path)
    raw = path.read_bytes()
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert set(record["tensors"]) == set(tensors) and len(tensors) == 63
    for key, entry in tensors.items():
        begin, end = entry["data_offsets"]
        item = record["tensors"][key]
        assert item["sha256"] == hashlib.sha256(raw[start + begin : start + end]).hexdigest()
        assert (item["dtype"], item["shape"]) == (entry["dtype"], entry["shape"])
    assert record["tensors"][MASK]["row_nnz"] == 30
    assert record["tensors"]["model.layers.0.mlp.down_proj.weight_mask"]["row_nnz"] == 47
    assert header["__metadata__"]["format"] == "pt"


@pytest.mark.parametrize("key, damage", TOTAL_PRESERVING_AND_VALUE_DAMAGE, ids=lambda v: getattr(v, "__name__", ""))
def test_damage_is_named_by_the_records(recorded, tmp_path, key, damage):
    broken = shutil.copytree(recorded, tmp_path / "broken")
    _edit_bytes_in_place(broken, key, damage)
    with pytest.raises(CheckpointIntegrityError, match=rf"`{key}` in .*model\.safetensors does not match its sha256"):
        _load_quietly(broken)
    code, lines = run_cli(["verify", str(broken)])
    summary = last_json(lines)
    assert code == 1 and summary["ok"] is False and summary["damaged"] is True
    assert any(f"`{key}`" in problem for problem in summary["problems"])


def test_opt_out_skips_the_hashes_but_not_the_structure(recorded, tmp_path, monkeypatch):
    values = shutil.copytree(recorded, tmp_path / "values")
    _edit_bytes_in_place(values, VALUES, _flip_value_byte)
    _load_quietly(values, oats_verify=False)  # loads: the hashes are what catch a damaged value
    monkeypatch.setenv(VERIFY_ENV, "0")
    _load_quietly(values)
    rows = shutil.copytree(recorded, tmp_path / "rows")
    _edit_bytes_in_place(rows, MASK, _move_bit_to_next_row)
    with pytest.raises(CheckpointError, match=rf"`{MASK}` keeps 29 weights in row 0 but every row .* keeps 30"):
        _load_quietly(rows)
    monkeypatch.setenv(VERIFY_ENV, "maybe")
    with pytest.raises(ValueError, match=rf"`{VERIFY_ENV}` must be 1 or 0.*got 'maybe'"):
        _load_quietly(recorded)


def test_sharded_save_records_each_shard(tmp_path):
    model = _load_quietly(UNRECORDED)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and all(read_record(shard) is not None for shard in shards)
    torch.testing.assert_close(_load_quietly(tmp_path / "sharded")(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    last = shards[-1]
    key = next(k for k in read_safetensors_header(last) if k.endswith(".weight") and k != "__metadata__")
    _edit_bytes_in_place(tmp_path / "sharded", key, _flip_value_byte, file=last.name)
    with pytest.raises(CheckpointIntegrityError, match=rf"`{key}` in .*{last.name} does not match"):
        _load_quietly(tmp_path / "sharded")
    first = shards[0].name
    shards[0].unlink()
    code, lines = run_cli(["verify", str(tmp_path / "sharded")])
    problems = last_json(lines)["problems"]
    assert code == 1 and f"Shard {first} listed in model.safetensors.index.json is missing from the folder." in (
        problems
    )
    assert any(f"`{key}` in" in problem and "does not match its sha256" in problem for problem in problems)


def test_records_added_to_a_written_folder_match_the_ones_written_at_save(recorded, tmp_path):
    """`write_records` (the fallback when transformers writes shards another way) gives the same record."""
    folder = shutil.copytree(UNRECORDED, tmp_path / "later")
    assert write_records(folder, missing_only=True) == [folder / "model.safetensors"]
    assert write_records(folder, missing_only=True) == []
    assert read_record(folder / "model.safetensors") == read_record(recorded / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(_load_quietly(folder)(IDS).logits, _load_quietly(recorded)(IDS).logits)


def test_push_to_hub_uploads_the_records(hub):
    from huggingface_hub import hf_hub_download

    model = _load_quietly(UNRECORDED)
    model.push_to_hub("user/recorded")  # transformers' own push: it saves through the patched `save_pretrained`
    downloaded = Path(hf_hub_download("user/recorded", "model.safetensors"))
    assert read_record(downloaded)["tensors"][MASK]["row_nnz"] == 30
    torch.testing.assert_close(_load_quietly("user/recorded")(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_verify_command_on_sound_and_unrecorded_checkpoints(recorded, caplog):
    code, lines = run_cli(["verify", str(recorded)])
    summary = last_json(lines)
    assert code == 0 and summary["ok"] and summary["records"] == "all" and summary["problems"] == []
    assert summary["tensors_hashed"] == 63 and summary["layers_checked"] == 14
    code, lines = run_cli(["verify", str(UNRECORDED)])
    summary = last_json(lines)
    assert code == 0 and summary["records"] == "none" and summary["layers_checked"] == 14
    with caplog.at_level("WARNING", logger="optimum_oats"):
        _load_quietly(UNRECORDED)
    assert "model.safetensors has no integrity record" in caplog.text


def test_verify_command_lists_structural_damage_without_records(tmp_path):
    broken = _damaged_copy(UNRECORDED, tmp_path / "broken", MASK, _move_bit_to_next_row)
    code, lines = run_cli(["verify", str(broken)])
    summary = last_json(lines)
    assert code == 1 and summary["records"] == "none"
    assert summary["problems"] == [
        f"Tensor `{MASK}` keeps 29 weights in row 0 but every row of this layer keeps 30. (model.safetensors)"
    ]


@pytest.mark.slow
def test_optimum_cli_verify_exits_1_on_damage(recorded, tmp_path):
    broken = shutil.copytree(recorded, tmp_path / "broken")
    _edit_bytes_in_place(broken, VALUES, _flip_value_byte)
    for folder, status in ((recorded, 0), (broken, 1)):
        done = subprocess.run(
            [*OPTIMUM_CLI, "oats", "verify", str(folder)],
            capture_output=True,
            text=True,
            env=_subprocess_env(),
            timeout=300,
        )
        assert done.returncode == status, done.stderr[-2000:]
        assert json.loads(done.stdout.splitlines()[-1])["damaged"] is bool(status)
    assert f"`{VALUES}` in {broken / 'model.safetensors'} does not match its sha256" in done.stderr


# ----------------------------------------------------------------------------------------------- fuzz
FUZZ_SEEDS = 240


def test_fuzz_every_mutation_loads_identical_or_fails_named(recorded, tmp_path):
    """Random bytes of a saved checkpoint changed (1 to 4 per seed; half the seeds in the header, where one byte
    can rename, retype or reshape a tensor or alter a record): each copy loads to bit-identical weights and logits,
    or fails with a `CheckpointError` (records, header or structure). None loads silently wrong."""
    reference = _load_quietly(recorded)
    with torch.no_grad():
        expected_logits = reference(IDS).logits
    expected = {k: v.clone() for k, v in reference.state_dict().items()}
    original = (recorded / "model.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    work = shutil.copytree(recorded, tmp_path / "work")
    outcomes, wrong = {"identical": 0, "named": 0}, []
    started = time.perf_counter()
    for seed in range(FUZZ_SEEDS):
        rng = random.Random(seed)
        low, high = (0, header_end) if seed % 2 else (header_end, len(original))
        mutated = bytearray(original)
        for position in rng.sample(range(low, high), rng.randint(1, 4)):
            # In the header, mostly characters JSON accepts, so the header still parses and the records are tested.
            byte = rng.choice(b'0123456789abcdefFUIB"[],: ') if seed % 2 and rng.random() < 0.75 else None
            mutated[position] = byte if byte is not None and byte != mutated[position] else mutated[position] ^ 0x5A
        (work / "model.safetensors").write_bytes(bytes(mutated))
        try:
            model = _load_quietly(work)
        except CheckpointError:
            outcomes["named"] += 1
            continue
        except Exception as error:  # noqa: BLE001  (any other failure is what this test looks for)
            wrong.append((seed, f"{type(error).__name__}: {error}"[:200]))
            continue
        state = model.state_dict()
        with torch.no_grad():
            same = state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
            same = same and torch.equal(model(IDS).logits, expected_logits)
        outcomes["identical" if same else "silently wrong"] = (
            outcomes.get("identical" if same else "silently wrong", 0) + 1
        )
        if not same:
            wrong.append((seed, "loaded with different weights or logits"))
    elapsed = time.perf_counter() - started
    assert not wrong, f"{len(wrong)} of {FUZZ_SEEDS} mutations: {wrong[:10]}"
    assert outcomes["named"] > FUZZ_SEEDS // 2, outcomes  # most mutations are damage, and are caught
    print(f"fuzz: {outcomes} in {elapsed:.1f} s")
