"""Scaling the compression loop: resume after a real SIGKILL, determinism, torchrun with 2 ranks, offloaded models.

The multi-process tests run `tests/engine/scaling_worker.py` in fresh processes with one thread each (results are
bit-identical only for the same thread count) and compare every tensor with `torch.equal`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from optimum_oats import LinearSparseLowRank, OATSConfig, compress
from optimum_oats.engine.resume import MANIFEST, ResumeMismatchError, _checksum
from optimum_oats.utils.files import file_sha256
from tests.helpers.tiny_models import build_tiny_model

WORKER = Path(__file__).resolve().parent / "scaling_worker.py"
# Slow enough per block (~1 s here) that a kill after the first finished block lands mid-run.
LAYERS_HIDDEN = (6, 64)
JOB_CONFIG = json.dumps({"num_samples": 4, "seqlen": 64, "method_settings": {"num_iterations": 80}})
JOB = ["--layers", str(LAYERS_HIDDEN[0]), "--hidden", str(LAYERS_HIDDEN[1]), "--config", JOB_CONFIG]


# transformers warns on every save of an offloaded model that free CPU memory must exceed the 50 GB default shard
# size; these tiny models' shards are a few hundred kB, so the note does not apply.
OFFLOADED_SAVE = pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules:UserWarning")


def _env(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OATS_DATA_DIR": str(data_dir)}


def _run_worker(data_dir: Path, out: Path, *extra: str, launcher: tuple[str, ...] = ()) -> None:
    command = [sys.executable, *launcher, str(WORKER), "--out", str(out), *JOB, *extra]
    result = subprocess.run(command, env=_env(data_dir), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_identical(path: Path, reference: Path) -> None:
    got, want = load_file(path), load_file(reference)
    assert got.keys() == want.keys()
    different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not different, f"tensors differ from the reference: {different[:5]}"
    with safe_open(path, "pt") as a, safe_open(reference, "pt") as b:
        assert a.metadata()["layer_map"] == b.metadata()["layer_map"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer, calibration_texts) -> Path:
    """The uninterrupted single-process result, computed in this process with one thread like the workers."""
    from tests.engine.scaling_worker import build_job, save_result

    out = tmp_path_factory.mktemp("reference") / "weights.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, cfg = build_job(tokenizer, calibration_texts, *LAYERS_HIDDEN, JOB_CONFIG)
        compress(model, cfg, tokenizer, progress=False)
    finally:
        torch.set_num_threads(threads)
    save_result(model, str(out))
    return out


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, data_dir, reference):
    resume_dir, out = tmp_path / "resume", tmp_path / "resumed.safetensors"
    command = [sys.executable, str(WORKER), "--out", str(out), *JOB, "--resume-dir", str(resume_dir)]
    process = subprocess.Popen(command, env=_env(data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = resume_dir / MANIFEST
    deadline = time.monotonic() + 240
    try:
        while not (manifest.is_file() and json.loads(manifest.read_text())["completed_blocks"] >= 1):
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the job never finished a block"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    completed = json.loads(manifest.read_text())["completed_blocks"]
    assert 1 <= completed < 6, "the kill should land mid-run"
    assert not out.exists()

    _run_worker(data_dir, out, "--resume-dir", str(resume_dir))
    _assert_identical(out, reference)
    assert json.loads(manifest.read_text())["completed_blocks"] == 6


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process(tmp_path, data_dir, reference):
    out = tmp_path / "distributed.safetensors"
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    _run_worker(data_dir, out, "--resume-dir", str(tmp_path / "resume"), launcher=launcher)
    for rank in (0, 1):  # every rank holds the full compressed model
        _assert_identical(Path(f"{out}.rank{rank}"), reference)
    assert json.loads((tmp_path / "resume" / MANIFEST).read_text())["completed_blocks"] == 6  # written by rank 0


def _cfg(texts, **kwargs):
    return OATSConfig(**{"dataset": texts, "num_samples": 2, "seqlen": 32, "num_iterations": 4, **kwargs})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(  # the exact solver is covered by test_compress.py::test_deterministic
    "settings", [dict(method="oats", svd="fast", layerwise="owl"), dict(method="sparsegpt")]
)
def test_same_inputs_and_seed_give_bit_identical_weights(settings, tiny_configs, tokenizer, calibration_texts):
    states = []
    for _ in range(2):
        model = build_tiny_model(tiny_configs["llama"])
        compress(model, _cfg(calibration_texts, seed=3, **settings), tokenizer, progress=False)
        states.append(_state(model))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resume_folder_of_a_finished_job_restores_everything(tmp_path, tiny_configs, tokenizer, calibration_texts):
    cfg = _cfg(calibration_texts, layerwise="owl")
    first = build_tiny_model(tiny_configs["llama"])
    compress(first, cfg, tokenizer, progress=False, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "block-00000.safetensors",
        "block-00001.safetensors",
        MANIFEST,
    ]
    second = build_tiny_model(tiny_configs["llama"])
    compress(second, cfg, tokenizer, progress=False, checkpoint_dir=tmp_path)
    a, b = _state(first), _state(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.config.quantization_config.layer_map == second.config.quantization_config.layer_map
    assert list(first.config.quantization_config.layer_map) == list(second.config.quantization_config.layer_map)


def test_resume_restores_quantized_layers_bit_exactly(tmp_path, tiny_configs, tokenizer, calibration_texts):
    """A finished block of a quantized job is saved as codes + scales and restored (decoded) to the same layer."""
    cfg = _cfg(calibration_texts, method="hassle", hessian_iterations=1, value_bits=4, lowrank_bits=8, group_size=32)
    first = build_tiny_model(tiny_configs["llama"])
    compress(first, cfg, tokenizer, progress=False, checkpoint_dir=tmp_path)
    second = build_tiny_model(tiny_configs["llama"])
    compress(second, cfg, tokenizer, progress=False, checkpoint_dir=tmp_path)
    a, b = _state(first), _state(second)
    assert any(k.endswith("weight_codes") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 5, 99, 300, 7]])
    assert torch.equal(first(ids).logits, second(ids).logits)
    assert first.config.quantization_config.layer_map == second.config.quantization_config.layer_map


def test_resume_folder_of_another_job_is_refused(tmp_path, tiny_configs, tokenizer, calibration_texts):
    compress(
        build_tiny_model(tiny_configs["llama"]),
        _cfg(calibration_texts),
        tokenizer,
        progress=False,
        checkpoint_dir=tmp_path,
    )
    with pytest.raises(ResumeMismatchError, match=r"config changed \(config fields: compression_rate\)"):
        compress(
            build_tiny_model(tiny_configs["llama"]),
            _cfg(calibration_texts, compression_rate=0.6),
            tokenizer,
            progress=False,
            checkpoint_dir=tmp_path,
        )
    with pytest.raises(ResumeMismatchError, match="first_sample_embeddings"):  # same shapes, other weights
        compress(
            build_tiny_model(tiny_configs["llama"], seed=1),
            _cfg(calibration_texts),
            tokenizer,
            progress=False,
            checkpoint_dir=tmp_path,
        )


def test_interrupted_write_leaves_the_last_complete_state(tmp_path, tiny_configs, tokenizer, calibration_texts):
    """A kill while block 1 is written leaves a torn temporary file, maybe a newer block file, and the manifest of
    block 0: resuming reads only what the manifest names and gives the uninterrupted result."""
    from safetensors.torch import save_file

    cfg = _cfg(calibration_texts)
    reference = build_tiny_model(tiny_configs["llama"])
    compress(reference, cfg, tokenizer, progress=False, checkpoint_dir=tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    hidden = tmp_path / "hidden-00001.safetensors"
    save_file({str(i): h for i, h in enumerate(_block1_inputs(reference, cfg, tokenizer))}, hidden)
    block0 = {k: v for k, v in manifest["layer_map"].items() if k.startswith("model.layers.0.")}
    files = {name: file_sha256(tmp_path / name) for name in ("block-00000.safetensors", hidden.name)}
    manifest.update(completed_blocks=1, layer_map=block0, hidden_file=hidden.name, files=files)
    manifest["checksum"] = _checksum(manifest)  # as the writer sealed it after block 0
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / ".block-00001.safetensors.x.tmp").write_bytes(b"\x00" * 17)
    (tmp_path / "block-00001.safetensors").write_bytes(b"garbage")

    model = build_tiny_model(tiny_configs["llama"])
    compress(model, cfg, tokenizer, progress=False, checkpoint_dir=tmp_path)
    a, b = _state(reference), _state(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / MANIFEST).read_text())["completed_blocks"] == 2


def _block1_inputs(compressed_model, cfg, tokenizer) -> list[torch.Tensor]:
    """Block 1's calibration inputs in the sequential scheme: block 0 (already compressed) applied to block 0's."""
    from optimum_oats.data.inputs import CalibrationData, calibration_inputs
    from optimum_oats.engine.blocks import find_main_block_stack
    from optimum_oats.engine.capture import block_forward, capture_block_inputs

    _, blocks = find_main_block_stack(compressed_model)
    data = CalibrationData.from_config(cfg, tokenizer=tokenizer)
    inputs = capture_block_inputs(compressed_model, blocks, calibration_inputs(compressed_model, cfg, data))
    with torch.no_grad():
        return block_forward(blocks[0], inputs.hidden_states, inputs.block_kwargs[0])


def _offloaded(dense_dir: Path, offload_dir: Path):
    from transformers import AutoModelForCausalLM

    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    return AutoModelForCausalLM.from_pretrained(dense_dir, device_map=device_map, offload_folder=offload_dir)


@OFFLOADED_SAVE
def test_disk_offloaded_model_compresses_like_in_memory(tmp_path, dense_dir, tokenizer, calibration_texts):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(calibration_texts, method="sparsegpt")
    in_memory = AutoModelForCausalLM.from_pretrained(dense_dir)
    compress(in_memory, cfg, tokenizer, progress=False)
    offloaded = _offloaded(dense_dir, tmp_path / "offload")
    compress(offloaded, cfg, tokenizer, progress=False)

    q_proj = offloaded.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, LinearSparseLowRank)
    assert q_proj.weight.device.type == "meta"  # compressed, and offloaded again
    assert (tmp_path / "offload" / "oats-model.layers.1.self_attn.q_proj.safetensors").is_file()
    assert offloaded.config.quantization_config.layer_map == in_memory.config.quantization_config.layer_map
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        expected = in_memory(ids).logits
        assert torch.equal(offloaded(ids).logits, expected)

    offloaded.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    reference = in_memory.state_dict()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)


def test_cpu_offload_and_resume_together(tmp_path, tiny_configs, tokenizer, calibration_texts):
    from accelerate import cpu_offload

    cfg = _cfg(calibration_texts, layerwise="owl")
    reference = build_tiny_model(tiny_configs["llama"])
    compress(reference, cfg, tokenizer, progress=False)
    for _ in range(2):  # the second run restores every block from the resume folder into the offloaded model
        model = cpu_offload(build_tiny_model(tiny_configs["llama"]), execution_device="cpu")
        compress(model, cfg, tokenizer, progress=False, checkpoint_dir=tmp_path)
        assert model.model.layers[0].mlp.down_proj.lowrank_u.device.type == "meta"
        ids = torch.randint(0, 1000, (1, 16))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)


@OFFLOADED_SAVE
def test_cli_offload_folder_and_resume_dir(tmp_path, dense_dir, tokenizer, calibration_texts):
    """`optimum-cli oats compress --offload-folder --resume-dir` gives the in-memory result, and saves it."""
    from transformers import AutoModelForCausalLM

    from optimum.commands.register.oats import main

    data = tmp_path / "calibration.txt"
    data.write_text(calibration_texts[0])
    options = ["--num-samples", "2", "--seqlen", "32", "--num-iterations", "4", "--dataset", str(data)]
    argv = ["compress", str(dense_dir), "-o", str(tmp_path / "out"), *options, "--device", "cpu"]
    main([*argv, "--offload-folder", str(tmp_path / "offload"), "--resume-dir", str(tmp_path / "resume")])
    assert json.loads((tmp_path / "resume" / MANIFEST).read_text())["completed_blocks"] == 2
    assert list((tmp_path / "offload").glob("oats-*.safetensors"))

    expected = AutoModelForCausalLM.from_pretrained(dense_dir)
    compress(expected, _cfg(str(data)), tokenizer, progress=False)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    reference = expected.state_dict()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded.model.layers[1].mlp.up_proj, LinearSparseLowRank)


def test_layer_assignment_is_deterministic_and_balanced():
    from optimum_oats.engine.distributed import _cost, assign_layers

    shapes = {  # one SmolLM2 block, (d_out, d_in)
        "self_attn.q_proj": (576, 576),
        "self_attn.k_proj": (192, 576),
        "self_attn.v_proj": (192, 576),
        "self_attn.o_proj": (576, 576),
        "mlp.gate_proj": (1536, 576),
        "mlp.up_proj": (1536, 576),
        "mlp.down_proj": (576, 1536),
    }
    owners = assign_layers(shapes, 2)
    assert set(owners) == set(shapes)
    assert owners == assign_layers(shapes, 2)
    loads = [sum(_cost(shapes[n]) for n in shapes if owners[n] == rank) for rank in (0, 1)]
    assert max(loads) < 0.55 * sum(loads)
    assert sorted(assign_layers(shapes, 7).values()) == list(range(7))  # one matrix each
