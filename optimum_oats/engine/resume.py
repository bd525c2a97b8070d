"""Resumable compression: after each block, its compressed layers and the next block's inputs go to a folder.

Layout of the resume folder (safetensors and JSON only, nothing is pickled):

- `block-00003.safetensors`: the compressed layers of block 3 (keys relative to the block, e.g.
  `self_attn.q_proj.lowrank_u`);
- `hidden-00004.safetensors`: the inputs of block 4 (one tensor per calibration sample, keys `"0"`, `"1"`, ...);
- `manifest.json`: the fingerprint of the job, how many blocks are complete, their `layer_map` entries and the
  hidden-states file to continue from.

Every file is written to a temporary name and moved into place with `os.replace`, the manifest last, so a kill at
any instant leaves a manifest that only names complete files. The per-block keyword arguments (masks, rotary
embeddings) are not stored: they are recomputed by the capture pass, which is cheap and deterministic.

A resume folder is tied to one job: the fingerprint covers the `OATSConfig` (but not where the job runs), the
model's architecture config and parameter shapes, the calibration token ids and the first sample's embeddings.
Restarting with anything else raises [`ResumeMismatchError`] naming what changed, rather than silently mixing
two jobs; delete the folder (or pick another) to start over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.files import atomic_save_tensors, atomic_write_json

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ResumeMismatchError(ValueError):
    """The resume folder belongs to a different compression job (config, model or calibration data)."""


@dataclass
class ResumeState:
    """What a resume folder holds: `completed` blocks, their `layer_map` entries, the next block's inputs."""

    completed: int
    layer_map: dict[str, dict[str, Any]]
    hidden_states: list[torch.Tensor] | None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> str:
    tensor = tensor.detach().to("cpu").contiguous()
    return _sha256(str((tuple(tensor.shape), str(tensor.dtype))).encode() + tensor.view(torch.uint8).numpy().tobytes())


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
        "calibration_tokens": _tensor_digest(input_ids),
        "first_sample_embeddings": _tensor_digest(first_hidden),
    }


def _versions() -> dict[str, str]:
    import transformers

    from ..utils.version import __version__

    return {"optimum_oats": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


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
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)

    def block_file(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.safetensors"

    def hidden_file(self, index: int) -> Path:
        return self.directory / f"hidden-{index:05d}.safetensors"

    def load(self) -> ResumeState | None:
        """The saved state, or None when the folder has no manifest yet; raises when it belongs to another job."""
        path = self.directory / MANIFEST
        if not path.is_file():
            return None
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise ResumeMismatchError(
                f"{path} has format {manifest.get('format')!r}, this version writes {FORMAT_VERSION}; "
                "delete the resume folder to start over."
            )
        if manifest["fingerprint"] != self.digest:
            raise ResumeMismatchError(self._describe_mismatch(path, manifest.get("fingerprint_parts", {})))
        if manifest.get("versions") != _versions():
            logger.warning(
                "Resuming a job started with %s under %s; results may differ slightly from an uninterrupted run.",
                manifest.get("versions"),
                _versions(),
            )
        completed = int(manifest["completed_blocks"])
        self.layer_map = dict(manifest["layer_map"])
        hidden = None
        if completed < self.num_blocks:
            from safetensors.torch import load_file

            tensors = load_file(self.directory / manifest["hidden_file"])
            hidden = [tensors[str(i)] for i in range(len(tensors))]
        logger.info("Resuming from %s: %d of %d blocks already compressed", self.directory, completed, self.num_blocks)
        return ResumeState(completed=completed, layer_map=dict(self.layer_map), hidden_states=hidden)

    def _describe_mismatch(self, path: Path, saved: dict[str, Any]) -> str:
        changed = [part for part in self.fingerprint if saved.get(part) != self.fingerprint[part]]
        details = ""
        if "config" in changed and isinstance(saved.get("config"), dict):
            fields = sorted(
                k
                for k in set(saved["config"]) | set(self.fingerprint["config"])
                if saved["config"].get(k) != self.fingerprint["config"].get(k)
            )
            details = f" (config fields: {', '.join(fields)})"
        return (
            f"The resume folder {path.parent} belongs to a different compression job: "
            f"{', '.join(changed) or 'fingerprint'} changed{details}. Use the same config, model and calibration data "
            "to resume, or delete the folder (or pass another one) to start over."
        )

    def load_block(self, index: int) -> dict[str, torch.Tensor]:
        """The compressed layers' tensors of completed block `index`, keyed relative to the block."""
        from safetensors.torch import load_file

        return load_file(self.block_file(index))

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
        atomic_save_tensors(self.block_file(index), tensors)
        hidden_name = None
        if next_hidden is not None:
            atomic_save_tensors(self.hidden_file(index + 1), {str(i): h for i, h in enumerate(next_hidden)})
            hidden_name = self.hidden_file(index + 1).name
        atomic_write_json(
            self.directory / MANIFEST,
            {
                "format": FORMAT_VERSION,
                "fingerprint": self.digest,
                "fingerprint_parts": self.fingerprint,
                "completed_blocks": index + 1,
                "num_blocks": self.num_blocks,
                "hidden_file": hidden_name,
                "layer_map": self.layer_map,
                "versions": _versions(),
            },
            indent=1,
            sort_keys=True,
        )
        stale = self.hidden_file(index)  # the manifest no longer names it
        if stale.exists():
            stale.unlink()
