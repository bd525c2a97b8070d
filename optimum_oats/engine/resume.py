"""Resumable compression: after each block, its compressed layers and the next block's inputs go to a folder.

Layout of the resume folder (safetensors and JSON only, nothing is pickled):

- `block-00003.safetensors`: the compressed layers of block 3 (keys relative to the block, e.g.
  `self_attn.q_proj.lowrank_u`);
- `hidden-00004.safetensors`: the inputs of block 4 (one tensor per calibration sample, keys `"0"`, `"1"`, ...);
- `manifest.json`: the fingerprint of the job, how many blocks are complete, their `layer_map` entries, the
  hidden-states file to continue from, the sha256 of every file it names, and a checksum of itself.

Every file is written to a temporary name and moved into place with `os.replace`, the manifest last, so a kill at
any instant leaves a manifest that only names complete files; temporary files left by a kill are removed when the
next job opens the folder. The per-block keyword arguments (masks, rotary embeddings) are not stored: they are
recomputed by the capture pass, which is cheap and deterministic.

A resume folder is tied to one job: the fingerprint covers the `OATSConfig` (but not where the job runs), the
model's architecture config, a sha256 of every weight (grouped by block), the calibration token ids, the first
sample's embeddings and the thread count (float sums are reduced in a thread-count-dependent order, so another
count gives other bits). Restarting with anything else raises [`ResumeMismatchError`] naming what changed, rather
than silently mixing two jobs. Every file is checked against its recorded sha256 before use: damage raises
[`ResumeCorruptedError`] naming the file. Either way the fix is to delete the folder (or pick another) to start
over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.files import atomic_save_tensors, atomic_write_json, file_sha256
from .offload import named_resident_tensors

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: per-file sha256, manifest checksum, weights and thread count in the fingerprint
_CHUNK = 1 << 22


class ResumeFolderError(ValueError):
    """The resume folder cannot be used for this job; the message names the reason and the folder to delete."""


class ResumeMismatchError(ResumeFolderError):
    """The resume folder belongs to a different compression job (config, model, calibration data or threads)."""


class ResumeCorruptedError(ResumeFolderError):
    """A file of the resume folder is damaged, truncated or missing (its sha256 or format does not check out)."""


@dataclass
class ResumeState:
    """What a resume folder holds: `completed` blocks, their `layer_map` entries, the next block's inputs."""

    completed: int
    layer_map: dict[str, dict[str, Any]]
    hidden_states: list[torch.Tensor] | None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _update_with_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    if tensor.device.type == "meta":  # no values anywhere (an empty skeleton): its shape is all there is
        return
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy


def _tensor_digest(tensor: torch.Tensor) -> str:
    digest = hashlib.sha256()
    _update_with_tensor(digest, "", tensor)
    return digest.hexdigest()


_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # `model.layers.3.mlp.up_proj.weight` -> `model.layers.3`


def weights_fingerprint(model: nn.Module) -> dict[str, str]:
    """A sha256 of every parameter and buffer of `model` (offloaded ones read from their weights map), one per
    block (`model.layers.3`) and one per tensor outside the blocks, so a mismatch can name where it is."""
    digests: dict[str, Any] = {}
    for name, tensor in named_resident_tensors(model):
        match = _BLOCK.match(name)
        group = match.group(1) if match else name
        _update_with_tensor(digests.setdefault(group, hashlib.sha256()), name, tensor)
    return {group: digest.hexdigest() for group, digest in digests.items()}


def job_fingerprint(
    config_dict: dict[str, Any], model: nn.Module, input_ids: torch.Tensor, first_hidden: torch.Tensor
) -> dict[str, Any]:
    """The parts that identify a compression job; equal parts mean resuming gives the uninterrupted result."""
    config = {k: v for k, v in config_dict.items() if k != "layer_map"}
    model_config = getattr(model, "config", None)
    architecture = model_config.to_dict() if hasattr(model_config, "to_dict") else {}
    for volatile in ("_name_or_path", "transformers_version", "quantization_config", "_commit_hash"):
        architecture.pop(volatile, None)
    shapes = [(name, tuple(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    return {
        "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
        "model": _sha256(
            json.dumps([type(model).__name__, architecture, shapes], sort_keys=True, default=str).encode()
        ),
        "weights": weights_fingerprint(model),
        "calibration_tokens": _tensor_digest(input_ids),
        "first_sample_embeddings": _tensor_digest(first_hidden),
        "threads": torch.get_num_threads(),
    }


def _versions() -> dict[str, str]:
    import transformers

    from ..utils.version import __version__

    return {"optimum_oats": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return _sha256(json.dumps(body, sort_keys=True).encode())


def _differences(saved: Any, current: Any, limit: int = 4) -> str:
    """What differs between two fingerprint parts, in a few words."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more
    if isinstance(saved, int | float | str) and len(str(saved)) < 20:
        return f"folder {saved!r}, now {current!r}"
    return ""


class ResumeFolder:
    """Reads and writes one job's resume folder.

    Args:
        directory: the folder (created if missing).
        fingerprint: from [`job_fingerprint`].
        num_blocks: blocks in the model.
        writer: whether this process writes (in a distributed job only rank 0 does; every rank reads).
    """

    def __init__(
        self, directory: str | os.PathLike, fingerprint: dict[str, Any], num_blocks: int, writer: bool = True
    ):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.digest = _sha256(json.dumps(fingerprint, sort_keys=True).encode())
        self.num_blocks = num_blocks
        self.writer = writer
        self.layer_map: dict[str, dict[str, Any]] = {}
        self.files: dict[str, str] = {}  # file name -> sha256, of the files the manifest names
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_orphans()

    def block_file(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.safetensors"

    def hidden_file(self, index: int) -> Path:
        return self.directory / f"hidden-{index:05d}.safetensors"

    def _remove_orphans(self) -> None:
        """Temporary files of writes a kill interrupted: never named by a manifest, so never needed."""
        for path in self._orphans():
            logger.info("Removing %s, left by an interrupted write", path)
            path.unlink(missing_ok=True)

    def _orphans(self) -> Iterator[Path]:
        return (p for p in self.directory.iterdir() if p.name.endswith(".tmp") and p.is_file())

    def _delete_hint(self) -> str:
        return f"Delete the resume folder {self.directory} (or pass another one) to start over."

    def _corrupted(self, path: Path, problem: str) -> ResumeCorruptedError:
        return ResumeCorruptedError(
            f"{path} in the resume folder is {problem}, so the saved progress cannot be trusted. {self._delete_hint()}"
        )

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        try:
            manifest = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._corrupted(path, f"not valid JSON (truncated or damaged: {err})") from err
        if not isinstance(manifest, dict):
            raise self._corrupted(path, f"not a JSON object (found {type(manifest).__name__})")
        if manifest.get("format") != FORMAT_VERSION:
            raise ResumeMismatchError(
                f"{path} has format {manifest.get('format')!r}, this version reads {FORMAT_VERSION}. "
                + self._delete_hint()
            )
        if manifest.get("checksum") != _checksum(manifest):
            raise self._corrupted(path, "damaged (its checksum does not match its content)")
        return manifest

    def _verified(self, name: str) -> Path:
        """The path of `name` after checking it against the sha256 the manifest recorded for it."""
        path = self.directory / name
        expected = self.files.get(name)
        if expected is None:
            raise self._corrupted(path, "not recorded in the manifest")
        try:
            found = file_sha256(path)
        except FileNotFoundError as err:
            raise self._corrupted(path, "missing") from err
        if found != expected:
            raise self._corrupted(path, f"damaged or truncated (sha256 {found[:12]}..., recorded {expected[:12]}...)")
        return path

    def _load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._verified(name)
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            raise self._corrupted(path, f"not a readable safetensors file ({err})") from err

    def load(self) -> ResumeState | None:
        """The saved state, or None when the folder has no manifest yet; raises when it belongs to another job or
        a file it names is damaged."""
        path = self.directory / MANIFEST
        if not path.is_file():
            return None
        manifest = self._read_manifest(path)
        if manifest.get("fingerprint") != self.digest:
            raise ResumeMismatchError(self._describe_mismatch(path, manifest.get("fingerprint_parts", {})))
        if manifest.get("versions") != _versions():
            logger.warning(
                "Resuming a job started with %s under %s; results may differ slightly from an uninterrupted run.",
                manifest.get("versions"),
                _versions(),
            )
        try:
            completed = int(manifest["completed_blocks"])
            self.layer_map = dict(manifest["layer_map"])
            self.files = dict(manifest["files"])
            hidden_name = manifest["hidden_file"]
        except (KeyError, TypeError, ValueError) as err:
            raise self._corrupted(path, f"missing or malformed entry ({err})") from err
        hidden = None
        if completed < self.num_blocks:
            if not isinstance(hidden_name, str):
                raise self._corrupted(path, f"naming no hidden-states file although {completed} < {self.num_blocks}")
            tensors = self._load_tensors(hidden_name)
            if set(tensors) != {str(i) for i in range(len(tensors))}:
                raise self._corrupted(self.directory / hidden_name, "holding unexpected tensor names")
            hidden = [tensors[str(i)] for i in range(len(tensors))]
        logger.info("Resuming from %s: %d of %d blocks already compressed", self.directory, completed, self.num_blocks)
        return ResumeState(completed=completed, layer_map=dict(self.layer_map), hidden_states=hidden)

    def _describe_mismatch(self, path: Path, saved: dict[str, Any]) -> str:
        changed = [part for part in self.fingerprint if saved.get(part) != self.fingerprint[part]]
        labels = {"config": "config fields", "weights": "weights of", "threads": "threads"}
        details = [
            f"{labels[part]}: {found}"
            for part in changed
            if part in labels and (found := _differences(saved.get(part), self.fingerprint[part]))
        ]
        hint = ""
        if "threads" in changed:
            threads = saved.get("threads")
            hint = (
                " The thread count decides the order of float sums, so resuming needs the count the folder was "
                f"written with (`torch.set_num_threads({threads})` or `OMP_NUM_THREADS={threads}`)."
            )
        what = f" ({'; '.join(details)})" if details else ""
        return (
            f"The resume folder {path.parent} belongs to a different compression job: "
            f"{', '.join(changed) or 'fingerprint'} changed{what}.{hint} "
            f"Use the same config, model, calibration data and thread count to resume, or delete the folder "
            f"{path.parent} (or pass another one) to start over."
        )

    def load_block(self, index: int) -> dict[str, torch.Tensor]:
        """The compressed layers' tensors of completed block `index`, keyed relative to the block."""
        return self._load_tensors(self.block_file(index).name)

    def _save(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_tensors(path, tensors)
        self.files[path.name] = file_sha256(path)

    def save_block(
        self,
        index: int,
        layers: dict[str, nn.Module],
        entries: dict[str, dict[str, Any]],
        next_hidden: list[torch.Tensor] | None,
    ) -> None:
        """Record block `index` as complete: its layers, its `layer_map` entries and the next block's inputs."""
        self.layer_map.update(entries)
        if not self.writer:
            return
        tensors = {f"{name}.{key}": t for name, layer in layers.items() for key, t in layer.state_dict().items()}
        self._save(self.block_file(index), tensors)
        stale = self.hidden_file(index)  # the new manifest no longer names it
        self.files.pop(stale.name, None)
        hidden_name = None
        if next_hidden is not None:
            self._save(self.hidden_file(index + 1), {str(i): h for i, h in enumerate(next_hidden)})
            hidden_name = self.hidden_file(index + 1).name
        manifest = {
            "format": FORMAT_VERSION,
            "fingerprint": self.digest,
            "fingerprint_parts": self.fingerprint,
            "completed_blocks": index + 1,
            "num_blocks": self.num_blocks,
            "hidden_file": hidden_name,
            "layer_map": self.layer_map,
            "files": self.files,
            "versions": _versions(),
        }
        manifest["checksum"] = _checksum(manifest)
        atomic_write_json(self.directory / MANIFEST, manifest, indent=1, sort_keys=True)
        if stale.exists():
            stale.unlink()
