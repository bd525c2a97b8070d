"""Writing files so that a crash never leaves one half-written: a temporary sibling, fsync, then `os.replace`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in chunks (a checkpoint shard or library need not fit in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, fsync: bool = True) -> Path:
    """Call `write(tmp_path)` on a temporary sibling of `path`, then move it into place in one rename.

    Readers see the old file or the complete new one, never a partial one; the temporary file is removed when
    `write` fails.
    """
    path = Path(path)
    tmp = _new_sibling(path)
    try:
        write(tmp)
        if fsync:
            handle = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _new_sibling(path: Path) -> str:
    """An empty, new temporary file beside `path` with the mode a plain `open()` gives (0o666 less the umask).

    Not `tempfile.mkstemp`: its 0600 mode would become the final file's mode after the rename.
    """
    while True:
        tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - a 48-bit random name taken
            continue


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """Save `tensors` (moved to CPU, made contiguous) as a safetensors file, atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, tmp))


@contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success move its files into `target`, config files last.

    A failure while writing (full disk, serialization error, interrupt) leaves `target` exactly as it was and
    removes the staging folder. A new `target` appears in one atomic rename. Into an existing folder, its old
    `config.json` is removed before any other file is replaced and the new one lands last, so even a failure
    while moving never leaves a mix of old and new files that loads as a checkpoint.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not `mkdtemp`: its 0700 mode would become the saved folder's mode after the final rename.
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        if not target.exists():
            os.replace(staging, target)
            return
        staged = sorted(staging.iterdir(), key=lambda p: p.name == "config.json")
        names = {p.name for p in staged}
        (target / "config.json").unlink(missing_ok=True)
        for stale in target.glob("model*.safetensors*"):
            if stale.name not in names:
                stale.unlink()
        for path in staged:
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
