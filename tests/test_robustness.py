"""Bad input gives a clear error naming the problem and the fix, and nothing is lost: calibration data, broken
and tied weights, failed saves, damaged checkpoints, pickles, and loading without the plugin."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import optimum_oats
from optimum_oats import LinearSparseLowRank, compress
from optimum_oats.data.text import CalibrationDataError
from optimum_oats.engine.guards import SharedWeightError
from optimum_oats.integrations.checkpoint import CheckpointError, read_safetensors_header
from tests.helpers.compressed import tiny_oats_config
from tests.helpers.tiny_models import build_tiny_model

IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])
PACKAGE = Path(optimum_oats.__file__).parent


@pytest.fixture(scope="module")
def texts(calibration_texts) -> list[str]:
    return calibration_texts[:100]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


# ----------------------------------------------------------------------------------------------- calibration data
@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", "holds no text"),
        ("blank.jsonl", "\n\n   \n", "holds no text"),
        ("spaces.jsonl", '{"text": "   "}\n{"text": ""}\n', "holds no text"),
        ("short.txt", "Only a few words.", r"fewer than one window of `seqlen=32`.*lower `seqlen`"),
        ("notext.jsonl", '{"content": "hello"}\n', r"Record 1 of .*notext\.jsonl has no string 'text' field"),
        ("broken.jsonl", '{"text": "a"\n', r"broken\.jsonl is not valid UTF-8 text/JSON"),
        ("latin1.txt", "caf\xe9 " * 500, r"latin1\.txt is not valid UTF-8"),
        ("object.json", '{"text": "a"}', r"object\.json must hold a list of records"),
    ],
)
def test_bad_calibration_files_are_named(name, content, message, tiny_llama, tokenizer, tmp_path):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1" if name == "latin1.txt" else "utf-8"))
    with pytest.raises(CalibrationDataError, match=message):
        compress(tiny_llama, tiny_oats_config(str(path)), tokenizer, progress=False)
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, nn.Linear)  # refused before anything changed


def test_too_little_text_for_all_windows_warns_and_uses_what_there_is(tiny_llama, tokenizer, caplog):
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)  # ~120 tokens: 3 windows of 32
    compress(tiny_llama, tiny_oats_config([text], num_samples=50, method="wanda"), tokenizer, progress=False)
    assert "windows of 32 instead of the 50 requested" in caplog.text


# ----------------------------------------------------------------------------------------------- broken weights
def test_non_finite_weight_is_refused_naming_the_layer(tiny_llama, tokenizer, texts):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[3, 5] = float("inf")
    with pytest.raises(ValueError, match=r"`model\.layers\.1\.mlp\.down_proj\.weight` holds 1 NaN/Inf values"):
        compress(tiny_llama, tiny_oats_config(texts), tokenizer, progress=False)


@pytest.mark.parametrize("poison", ["embedding", "norm"])
def test_non_finite_activations_are_refused_naming_the_layer(poison, tiny_llama, tokenizer, texts):
    with torch.no_grad():
        if poison == "embedding":
            tiny_llama.model.embed_tokens.weight.fill_(float("nan"))
        else:  # a broken norm (e.g. float16 overflow) feeds Inf/NaN to the attention projections
            tiny_llama.model.layers[0].input_layernorm.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"of `model\.layers\.0\.self_attn\.q_proj` is not finite \(NaN/Inf"):
        compress(tiny_llama, tiny_oats_config(texts), tokenizer, progress=False)


# ----------------------------------------------------------------------------------------------- tied and shared
def test_tied_embeddings_stay_tied_and_lm_head_is_never_compressed(tiny_configs, tokenizer, texts, tmp_path):
    config = tiny_configs["llama"].__class__(**{**tiny_configs["llama"].to_dict(), "tie_word_embeddings": True})
    model = build_tiny_model(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    compress(model, tiny_oats_config(texts, method="wanda"), tokenizer, progress=False)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert not any("lm_head" in name or "embed" in name for name in model.config.quantization_config.layer_map)
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # stored once
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert torch.equal(again(IDS).logits, expected)


def test_linears_sharing_one_weight_are_refused_with_the_fix(tiny_llama, tokenizer, texts):
    attention = tiny_llama.model.layers[0].self_attn
    attention.v_proj.weight = attention.k_proj.weight  # both (32, 64)
    shared = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    for skip in (None, shared[:1]):  # keeping only one of them dense would still untie them
        with pytest.raises(SharedWeightError, match=r"shared by 2 modules.*modules_to_not_convert=") as excinfo:
            compress(tiny_llama, tiny_oats_config(texts, modules_to_not_convert=skip), tokenizer, progress=False)
        assert all(f"`{name}`" in str(excinfo.value) for name in shared)
        assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, nn.Linear)  # refused before any change
    compress(
        tiny_llama, tiny_oats_config(texts, modules_to_not_convert=shared, method="wanda"), tokenizer, progress=False
    )
    assert attention.v_proj.weight is attention.k_proj.weight  # the fix given in the message works: still tied
    assert isinstance(attention.q_proj, LinearSparseLowRank)


def test_a_block_used_twice_is_refused(tiny_llama, tokenizer, texts):
    tiny_llama.model.layers[1] = tiny_llama.model.layers[0]
    with pytest.raises(SharedWeightError, match=r"`model\.layers\.0\.self_attn\.q_proj`, `model\.layers\.1\."):
        compress(tiny_llama, tiny_oats_config(texts), tokenizer, progress=False)


# ----------------------------------------------------------------------------------------------- failed saves
def _failing_writer(fail_on_call: int, error: BaseException):
    """safetensors' writer that writes normally, then writes half a file and raises on call `fail_on_call`.

    Only the writer is replaced: what is under test is the staging around it (a real full disk cannot be made
    without root-only tools)."""
    from safetensors.torch import save_file as real_save_file

    calls = []

    def writer(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == fail_on_call:
            Path(filename).write_bytes(b"\x00" * 100)
            raise error
        return real_save_file(tensors, filename, metadata=metadata)

    return writer


@pytest.mark.parametrize(
    "fail_on_call, error",
    [
        (1, OSError(28, "No space left on device")),
        (2, OSError(28, "No space left on device")),
        (2, KeyboardInterrupt()),
    ],
)
def test_failed_save_leaves_existing_checkpoint_untouched(fail_on_call, error, checkpoint, tmp_path, monkeypatch):
    target = _copy(checkpoint, tmp_path / "out")
    (target / "tokenizer.json").write_text("{}")  # a user's file beside the checkpoint
    before = _snapshot(target)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", _failing_writer(fail_on_call, error))
    with pytest.raises(type(error)):
        model.save_pretrained(target, max_shard_size="200KB")  # several shards: the failure is partway
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    monkeypatch.undo()
    assert torch.equal(AutoModelForCausalLM.from_pretrained(target)(IDS).logits, model(IDS).logits)


def test_failure_while_moving_into_place_never_leaves_a_loadable_mix(checkpoint, tmp_path):
    target = _copy(checkpoint, tmp_path / "out")
    (target / "oats_report.json").unlink()
    (target / "oats_report.json").mkdir()  # a real obstacle: a file cannot replace a non-empty directory
    (target / "oats_report.json" / "keep").write_text("x")
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    with pytest.raises(OSError):
        model.save_pretrained(target)
    assert not (target / "config.json").exists()  # the old config went first, the new one never arrived
    with pytest.raises((OSError, ValueError), match="config.json"):  # transformers: not a model folder
        AutoModelForCausalLM.from_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_new_folder_appears_whole_with_the_usual_mode(checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    (tmp_path / "reference").mkdir()
    model.save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "reference"]
    assert (tmp_path / "new").stat().st_mode == (tmp_path / "reference").stat().st_mode
    model.save_pretrained(tmp_path / "new", max_shard_size="200KB")  # re-save sharded over it...
    model.save_pretrained(tmp_path / "new")  # ...and unsharded again: no stale shard or index is left
    assert (
        not list((tmp_path / "new").glob("model-*"))
        and not (tmp_path / "new" / "model.safetensors.index.json").exists()
    )
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "new")(IDS).logits, model(IDS).logits)


# ----------------------------------------------------------------------------------------------- damaged checkpoints
def _rewrite_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_truncated_tensor_is_named(checkpoint, tmp_path):
    broken = _copy(checkpoint, tmp_path / "broken")
    key = "model.layers.0.mlp.up_proj.weight"
    _rewrite_tensors(broken, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    with pytest.raises(CheckpointError, match=rf"`{key}` in .*model\.safetensors has shape .*disagree"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    broken = _copy(checkpoint, tmp_path / "broken")
    _rewrite_tensors(broken, lambda t: t.pop("model.layers.1.self_attn.o_proj.lowrank_v"))
    with pytest.raises(CheckpointError, match=r"`model\.layers\.1\.self_attn\.o_proj\.lowrank_v` is missing"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_altered_mask_bits_are_named(checkpoint, tmp_path):
    broken = _copy(checkpoint, tmp_path / "broken")
    key = "model.layers.1.mlp.gate_proj.weight_mask"

    def flip(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] ^= 0b1  # same shape, one bit different: would scatter values to wrong places

    _rewrite_tensors(broken, flip)
    with pytest.raises(CheckpointError, match=rf"`{key}` marks \d+ kept weights but .* holds \d+ values"):
        AutoModelForCausalLM.from_pretrained(broken)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"rank": -1, "nnz": 10}, r"`layer_map\['model\.layers\.0\.mlp\.up_proj'\]\['rank'\]` must be >= 0"),
        ({"rank": "4", "nnz": 10}, r"`layer_map\['model\.layers\.0\.mlp\.up_proj'\]\['rank'\]` must be an integer"),
        ({"nnz": 10}, r"`layer_map\['model\.layers\.0\.mlp\.up_proj'\]` has no 'rank'"),
    ],
)
def test_edited_layer_map_is_named(entry, message, checkpoint, tmp_path):
    broken = _copy(checkpoint, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["layer_map"]["model.layers.0.mlp.up_proj"] = entry
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, TypeError), match=message):
        AutoModelForCausalLM.from_pretrained(broken)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "too short to hold a safetensors header"),
        ((2).to_bytes(8, "little") + b"[]", r"corrupted safetensors header \(not a JSON object\)"),
        (
            (40).to_bytes(8, "little") + b'{"x": {"dtype": "F32", "shape": [1]}}'.ljust(40),
            r"the entry of `x` is malformed",
        ),
        ((10**12).to_bytes(8, "little") + b"{}", "declares a 1000000000000-byte header"),
    ],
)
def test_damaged_safetensors_headers_are_named(payload, message, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=message):
        read_safetensors_header(path)


# ----------------------------------------------------------------------------------------------- nothing unpickled
class _Marker:
    """Unpickling this (with `weights_only=False`) creates a file: proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_checkpoint_is_refused_and_never_unpickled(checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    marker = tmp_path / "unpickled"
    torch.save({"model.embed_tokens.weight": _Marker(str(marker))}, folder / "pytorch_model.bin")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))  # a spy, not a stub
    for kwargs in ({}, {"use_safetensors": False}):
        with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not a safetensors file"):
            AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    assert loads == [] and not marker.exists()


def test_package_never_unpickles():
    """No code path of the package can unpickle: no torch.load, pickle, or weights_only=False anywhere."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for needle in ("torch.load(", "import pickle", "pickle.load", "weights_only=False", "import dill"):
            if needle in text:
                offenders.append(f"{path.relative_to(PACKAGE)}: {needle}")
    assert offenders == []


# ----------------------------------------------------------------------------------------------- no plugin
@pytest.mark.slow
def test_loading_without_the_plugin_fails_and_says_why(checkpoint, tmp_path):
    """transformers only *warns* about the unknown `oats` method, then refuses on the compact shapes; with
    `trust_remote_code=True` the checkpoint's own `modeling_oats.py` names the package to install."""
    script = f"""
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})
except Exception as error:
    print("PLAIN", type(error).__name__, error, file=sys.stderr)
else:
    print("PLAIN loaded", file=sys.stderr)
sys.modules["optimum_oats"] = None  # as if the package were not installed
try:
    AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
except ImportError as error:
    print("REMOTE", type(error).__name__, error, file=sys.stderr)
else:
    print("REMOTE loaded", file=sys.stderr)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "Unknown quantization type, got oats" in err  # transformers names the method it does not know...
    assert "PLAIN RuntimeError" in err and "ignore_mismatched_sizes" in err  # ...and refuses the compact tensors
    assert "PLAIN loaded" not in err
    assert "REMOTE ImportError" in err and "`pip install optimum-oats`" in err
    assert "REMOTE loaded" not in err
