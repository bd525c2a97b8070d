"""The resume folder is never trusted blindly: damage, another job's folder and another thread count are named
errors that say what to delete, and a fuzz test shows that no mutation of a folder resumes to a wrong result.

Interruptions are made in-process (an exception raised when block 1 starts), which leaves the folder exactly as a
kill at that point would: block 0, the inputs of block 1 and the manifest naming them. The real SIGKILL is covered
by tests/engine/test_scaling.py.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch

from optimum_oats import OATSConfig, compress
from optimum_oats.engine import loop
from optimum_oats.engine.resume import (
    MANIFEST,
    ResumeCorruptedError,
    ResumeFolderError,
    ResumeMismatchError,
)
from tests.helpers.tiny_models import build_tiny_model

BLOCK0, BLOCK1, HIDDEN1 = "block-00000.safetensors", "block-00001.safetensors", "hidden-00001.safetensors"


class _Interrupted(Exception):
    pass


def _cfg(texts) -> OATSConfig:
    # A few paragraphs are plenty for 2 x 32 tokens, and tokenizing them is fast (the whole file takes ~3 s).
    return OATSConfig(dataset=texts[:50], num_samples=2, seqlen=32, num_iterations=4)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _run(config, cfg, tokenizer, folder: Path, model=None):
    model = model if model is not None else build_tiny_model(config)
    compress(model, cfg, tokenizer, progress=False, checkpoint_dir=folder)
    return model


def _interrupted_run(config, cfg, tokenizer, folder: Path, monkeypatch) -> None:
    """Compress until block 1 starts, then fail: the folder holds block 0, block 1's inputs and the manifest."""
    original = loop.compress_block

    def failing(prefix, *args, **kwargs):
        if prefix.endswith(".1"):
            raise _Interrupted
        return original(prefix, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "compress_block", failing)
        with pytest.raises(_Interrupted):
            _run(config, cfg, tokenizer, folder)


@pytest.fixture(scope="module")
def job(tiny_configs, tokenizer, calibration_texts, tmp_path_factory):
    """The uninterrupted result, a finished folder and an interrupted one (after block 0)."""
    config, cfg = tiny_configs["llama"], _cfg(calibration_texts)
    finished, partial = tmp_path_factory.mktemp("finished"), tmp_path_factory.mktemp("partial")
    reference = _state(_run(config, cfg, tokenizer, finished))
    assert sorted(p.name for p in finished.iterdir()) == [BLOCK0, BLOCK1, MANIFEST]
    with pytest.MonkeyPatch.context() as monkeypatch:
        _interrupted_run(config, cfg, tokenizer, partial, monkeypatch)
    assert sorted(p.name for p in partial.iterdir()) == [BLOCK0, HIDDEN1, MANIFEST]
    return {"config": config, "cfg": cfg, "reference": reference, "finished": finished, "partial": partial}


def _copy(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "resume"
    shutil.copytree(source, target)
    return target


def _assert_reference(model, reference) -> None:
    state = _state(model)
    assert state.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(state[k], reference[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_interrupted_folder_resumes_to_the_uninterrupted_result(job, tokenizer, tmp_path):
    folder = _copy(job["partial"], tmp_path)
    _assert_reference(_run(job["config"], job["cfg"], tokenizer, folder), job["reference"])


@pytest.mark.parametrize("name", [BLOCK0, HIDDEN1])
def test_flipped_byte_in_a_saved_file_is_a_named_error(name, job, tokenizer, tmp_path):
    """Used to end "ok" with weights that differ from the uninterrupted run."""
    folder = _copy(job["partial"], tmp_path)
    _flip(folder / name, (folder / name).stat().st_size - 7)  # a tensor byte, past the header
    with pytest.raises(ResumeCorruptedError, match=rf"{name} in the resume folder is damaged.*Delete the resume"):
        _run(job["config"], job["cfg"], tokenizer, folder)


def test_flipped_byte_in_a_finished_folder_block_is_a_named_error(job, tokenizer, tmp_path):
    folder = _copy(job["finished"], tmp_path)
    _flip(folder / BLOCK1, 200)
    with pytest.raises(ResumeCorruptedError, match=BLOCK1):
        _run(job["config"], job["cfg"], tokenizer, folder)


def test_folder_of_a_model_with_one_block_scaled_is_refused(job, tokenizer, tmp_path):
    """Same architecture and embeddings, block 1's weights x 1.5: used to be accepted, mixing the two jobs."""
    folder = _copy(job["finished"], tmp_path)
    other = build_tiny_model(job["config"])
    with torch.no_grad():
        for parameter in other.model.layers[1].parameters():
            parameter.mul_(1.5)
    pattern = r"weights changed \(weights of: model\.layers\.1\).*delete the folder"
    with pytest.raises(ResumeMismatchError, match=pattern):
        _run(job["config"], job["cfg"], tokenizer, folder, model=other)


def test_another_thread_count_is_refused_with_the_count_to_use(job, tokenizer, tmp_path):
    folder = _copy(job["partial"], tmp_path)
    written = json.loads((folder / MANIFEST).read_text())["fingerprint_parts"]["threads"]
    assert written == torch.get_num_threads()
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(ResumeMismatchError, match=rf"threads changed.*set_num_threads\({threads}\)"):
            _run(job["config"], job["cfg"], tokenizer, folder)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [BLOCK0, HIDDEN1, MANIFEST])
def test_truncated_file_is_a_named_error(name, job, tokenizer, tmp_path):
    """Used to raise a bare `SafetensorError` / `JSONDecodeError` that names no file."""
    folder = _copy(job["partial"], tmp_path)
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ResumeCorruptedError, match=rf"{path}.*Delete the resume folder {folder}"):
        _run(job["config"], job["cfg"], tokenizer, folder)


def test_missing_file_is_a_named_error(job, tokenizer, tmp_path):
    folder = _copy(job["partial"], tmp_path)
    (folder / HIDDEN1).unlink()
    with pytest.raises(ResumeCorruptedError, match=rf"{HIDDEN1} in the resume folder is missing"):
        _run(job["config"], job["cfg"], tokenizer, folder)


def test_orphan_temporary_files_are_removed_at_start(job, tokenizer, tmp_path):
    folder = _copy(job["partial"], tmp_path)
    orphans = [folder / ".block-00001.safetensors.k2j4.tmp", folder / ".manifest.json.x81p.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"\x00" * 33)
    _assert_reference(_run(job["config"], job["cfg"], tokenizer, folder), job["reference"])
    assert not any(orphan.exists() for orphan in orphans)
    assert sorted(p.name for p in folder.iterdir()) == [BLOCK0, BLOCK1, MANIFEST]


def _mutate(folder: Path, rng: random.Random) -> str:
    """One random damage to one random file of `folder`; returns what was done (for the failure message)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    path = rng.choice(files)
    data = bytearray(path.read_bytes())
    kind = rng.choice(["flip", "flip", "byte", "truncate", "append", "delete", "orphan"])
    if kind in ("flip", "byte"):
        for _ in range(rng.randint(1, 3)):
            offset = rng.randrange(len(data))
            data[offset] = data[offset] ^ (1 << rng.randrange(8)) if kind == "flip" else rng.randrange(256)
        path.write_bytes(bytes(data))
    elif kind == "truncate":
        path.write_bytes(bytes(data[: rng.randrange(len(data))]))
    elif kind == "append":
        path.write_bytes(bytes(data) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))))
    elif kind == "delete":
        path.unlink()
    else:
        (folder / f".{path.name}.{rng.randrange(10**6)}.tmp").write_bytes(bytes(data[: rng.randrange(len(data))]))
    return f"{kind} {path.name}"


def test_fuzz_every_mutation_resumes_bit_identical_or_is_a_named_error(job, tokenizer, tmp_path):
    """Random byte flips, overwrites, truncations, appended bytes, deleted files and orphan temporary files in a
    finished and an interrupted folder. None may resume to different weights or fail with another exception.

    Each seed runs the loop on token ids tokenized once (`compress` differs only in tokenizing them again, which
    costs more than the rest here)."""
    from optimum_oats.data.inputs import CalibrationData, calibration_inputs

    pristine = build_tiny_model(job["config"])
    cfg = job["cfg"]
    input_ids = calibration_inputs(pristine, cfg, CalibrationData.from_config(cfg, tokenizer=tokenizer))
    seeds, budget, started = 400, 300.0, time.monotonic()
    outcomes: dict[str, int] = {"identical": 0, "named error": 0}
    for seed in range(seeds):
        if time.monotonic() - started > budget:
            break
        rng = random.Random(seed)
        folder = tmp_path / f"seed{seed}"
        shutil.copytree(job["partial"] if seed % 2 else job["finished"], folder)
        what = _mutate(folder, rng)
        model = copy.deepcopy(pristine)
        try:
            loop.compress_with_inputs(model, cfg, input_ids, progress=False, checkpoint_dir=folder)
        except ResumeFolderError as err:
            assert str(folder) in str(err), f"seed {seed} ({what}): the error names no folder: {err}"
            outcomes["named error"] += 1
        except Exception as err:  # noqa: BLE001 -- anything else is the failure this test looks for
            raise AssertionError(f"seed {seed} ({what}) raised an unnamed {type(err).__name__}: {err}") from err
        else:
            state = _state(model)
            different = [k for k in job["reference"] if not torch.equal(state[k], job["reference"][k])]
            assert not different, f"seed {seed} ({what}) resumed to different weights: {different[:3]}"
            outcomes["identical"] += 1
        shutil.rmtree(folder)
    done = sum(outcomes.values())
    print(f"resume folder fuzz: {done} seeds in {time.monotonic() - started:.0f} s: {outcomes}")
    assert done >= 100, f"only {done} seeds ran in {budget:g} s: {outcomes}"
    assert outcomes["identical"] and outcomes["named error"], outcomes  # both outcomes occur
