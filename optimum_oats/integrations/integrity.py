"""Integrity records: a sha256 of every tensor, written into each safetensors file at save and checked at load.

Where the records live: in the `__metadata__` of the safetensors header of the very file whose tensors they
describe, under `oats_integrity` (a JSON string: safetensors metadata values are strings). The record travels
with the bytes it vouches for, whatever moves them:
- `save_pretrained` with `max_shard_size`: every shard carries the record of its own tensors, hashed from the
  tensors transformers hands to safetensors for that shard (after its renames and tied-weight removal), so no
  file is read back or rewritten (`integrations/transformers.py`);
- `push_to_hub` (transformers' or `oats push`) and `hf download` copy files byte for byte, and the Hub's own
  LFS sha256 covers transport only, not a file damaged before upload or after download;
- a folder copied by hand, or one shard replaced, is checked shard by shard.
`oats_report.json` or config.json would be a second file that can be left behind, regenerated or edited apart
from the weights (the report is optional for loading), and config.json is written before the shards exist.

Each entry holds the tensor's dtype, shape and the sha256 of its raw bytes (what `sha256sum` gives for the slice
`data_offsets` names), and for a bitmask (`*.weight_mask`) the kept count of every row when all rows are equal
(`row_nnz`), which the always-on structural check enforces (`checkpoint.mask_rules`).

Loading verifies by default, hashing in a background thread while transformers loads the tensors: on the 339 MB
SmolLM2-135M checkpoint about 1 s on a busy 2-core machine, +5% of a fresh process that imports, loads and runs a
forward pass, +73% of a bare `from_pretrained` (BENCHMARKS.md, "Integrity records"). `OATS_VERIFY_CHECKPOINTS=0` or
`from_pretrained(..., oats_verify=False)` skip the records (the structural checks of the masks stay on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..nn.packing import row_counts
from ..utils.files import atomic_write
from .checkpoint import CheckpointError, read_safetensors_header

logger = logging.getLogger(__name__)

RECORD_KEY = "oats_integrity"
RECORD_VERSION = 1
VERIFY_ENV = "OATS_VERIFY_CHECKPOINTS"
MASK_SUFFIX = ".weight_mask"
# Set by `from_pretrained(..., oats_verify=...)` for the duration of that call (None: follow the environment).
VERIFY_OVERRIDE: ContextVar[bool | None] = ContextVar("oats_verify", default=None)
_ALIGN = 8  # safetensors pads its header so the data starts 8-byte aligned


class CheckpointIntegrityError(CheckpointError):
    """A tensor's bytes, dtype or shape differ from the integrity record written when the checkpoint was saved."""


@dataclass
class VerifyResult:
    """What [`verify_files`] found: files checked, tensors checked, files without records, and the damage."""

    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    unrecorded: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verification_enabled() -> bool:
    """`from_pretrained(..., oats_verify=...)` when given, else `OATS_VERIFY_CHECKPOINTS` (default on)."""
    override = VERIFY_OVERRIDE.get()
    if override is not None:
        return override
    value = os.environ.get(VERIFY_ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on", ""):
        return True
    raise ValueError(f"`{VERIFY_ENV}` must be 1 or 0 (also true/false, yes/no, on/off), got {value!r}.")


def _tensors(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {key: entry for key, entry in header.items() if key != "__metadata__"}


def _data_start(path: Path) -> int:
    with path.open("rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def _digests(path: Path, header: dict[str, Any], workers: int | None = None) -> dict[str, str]:
    """sha256 of each tensor's bytes, hashed in threads (hashlib releases the GIL) over a read-only mapping."""
    tensors = _tensors(header)
    start = _data_start(path)
    if not tensors:
        return {}
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:

            def digest(entry: dict[str, Any]) -> str:
                begin, end = entry["data_offsets"]
                return hashlib.sha256(view[start + begin : start + end]).hexdigest()

            # Largest first, so the embedding does not start last and leave the other threads idle.
            order = sorted(tensors, key=lambda k: tensors[k]["data_offsets"][0] - tensors[k]["data_offsets"][1])
            with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
                hashes = dict(zip(order, pool.map(lambda k: digest(tensors[k]), order), strict=True))
        finally:
            view.release()
    return hashes


def _uniform_row_count(path: Path, entry: dict[str, Any]) -> int | None:
    """The kept count shared by every row of a stored bitmask, or None when the rows differ."""
    if entry["dtype"] != "U8" or len(entry["shape"]) != 2 or not entry["shape"][0]:
        return None
    counts = row_counts(read_mask(path, entry))
    return int(counts[0]) if bool((counts == counts[0]).all()) else None


def read_mask(path: str | os.PathLike, entry: dict[str, Any]) -> torch.Tensor:
    """A stored uint8 bitmask, read straight from the file (a copy: masks are small)."""
    begin, end = entry["data_offsets"]
    with Path(path).open("rb") as handle:
        handle.seek(_data_start(Path(path)) + begin)
        data = bytearray(handle.read(end - begin))
    return torch.frombuffer(data, dtype=torch.uint8).view(*entry["shape"]) if data else torch.zeros(entry["shape"])


def make_record(path: str | os.PathLike, header: dict[str, Any] | None = None) -> dict[str, Any]:
    """The integrity record of a safetensors file as it is on disk."""
    path = Path(path)
    header = read_safetensors_header(path) if header is None else header
    digests = _digests(path, header)
    entries = {}
    for key, entry in _tensors(header).items():
        entries[key] = {"dtype": entry["dtype"], "shape": entry["shape"], "sha256": digests[key]}
        if key.endswith(MASK_SUFFIX) and (rows := _uniform_row_count(path, entry)) is not None:
            entries[key]["row_nnz"] = rows
    return {"version": RECORD_VERSION, "algorithm": "sha256", "tensors": entries}


# safetensors' dtype names of the torch dtypes a record can describe from memory.
_STORED_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.uint8: "U8",
    torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}  # fmt: skip


def record_of_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The record of a shard about to be written by safetensors, from its tensors in memory (the bytes safetensors
    writes: contiguous, little-endian); None when a dtype is not one this function knows (the file is then
    recorded after it is written, by [`write_records`])."""
    if any(tensor.dtype not in _STORED_NAMES for tensor in tensors.values()):
        return None
    data = {key: tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8) for key, tensor in tensors.items()}

    def digest(key: str) -> str:
        return hashlib.sha256(memoryview(data[key].numpy())).hexdigest()

    order = sorted(data, key=lambda k: -data[k].numel())
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = dict(zip(order, pool.map(digest, order), strict=True))
    entries = {}
    for key, tensor in tensors.items():
        entries[key] = {"dtype": _STORED_NAMES[tensor.dtype], "shape": list(tensor.shape), "sha256": hashes[key]}
        if key.endswith(MASK_SUFFIX) and tensor.dtype == torch.uint8 and tensor.dim() == 2 and tensor.shape[0]:
            counts = row_counts(tensor.detach().cpu())
            if bool((counts == counts[0]).all()):
                entries[key]["row_nnz"] = int(counts[0])
    return {"version": RECORD_VERSION, "algorithm": "sha256", "tensors": entries}


def encode_record(record: dict[str, Any]) -> str:
    """A record as the string stored under `oats_integrity` in the safetensors metadata."""
    return json.dumps(record, separators=(",", ":"), sort_keys=True)


def write_records(directory: str | os.PathLike, *, missing_only: bool = False) -> list[Path]:
    """Add an integrity record to the safetensors files of `directory` (a checkpoint just written), atomically;
    with `missing_only`, to those that have none yet.

    The header grows, so each file is rewritten: the new header, then the tensor bytes copied unchanged. A save
    normally records each shard as it is written (`integrations/transformers.py`) and needs none of this.
    """
    written = []
    for path in sorted(Path(directory).glob("*.safetensors")):
        header = read_safetensors_header(path)
        if missing_only and read_record(path, header) is not None:
            continue
        metadata = dict(header.get("__metadata__") or {})
        metadata[RECORD_KEY] = encode_record(make_record(path, header))
        new_header = {"__metadata__": metadata, **_tensors(header)}
        raw = json.dumps(new_header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % _ALIGN)
        start = _data_start(path)

        def write(tmp: str, source: Path = path, raw: bytes = raw, start: int = start) -> None:
            with source.open("rb") as src, open(tmp, "wb") as dst:
                dst.write(struct.pack("<Q", len(raw)) + raw)
                src.seek(start)
                shutil.copyfileobj(src, dst, 16 * 1024 * 1024)

        atomic_write(path, write, fsync=False)  # the staging folder's rename makes the save atomic
        written.append(path)
    return written


def read_record(path: str | os.PathLike, header: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The record stored in a safetensors file, or None when it has none (saved before 0.3 or by another tool).

    Raises:
        CheckpointIntegrityError: when a record is present but unreadable.
    """
    header = read_safetensors_header(path) if header is None else header
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or RECORD_KEY not in metadata:
        return None
    try:
        record = json.loads(metadata[RECORD_KEY])
        valid = (
            isinstance(record, dict)
            and record.get("algorithm") == "sha256"
            and isinstance(record.get("tensors"), dict)
            and all(_valid_item(item) for item in record["tensors"].values())
        )
    except (TypeError, json.JSONDecodeError):
        valid = False
    if not valid:
        raise CheckpointIntegrityError(
            f"{path} has an unreadable integrity record (`{RECORD_KEY}` in its safetensors metadata): the file's "
            "header is damaged. Download or copy the checkpoint again."
        )
    return record


def _valid_item(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("sha256"), str)
        and isinstance(item.get("dtype"), str)
        and isinstance(item.get("shape"), list)
        and isinstance(item.get("row_nnz", 0), int)
    )


def recorded_row_counts(files: Iterable[str | os.PathLike]) -> dict[str, int] | None:
    """`{mask key as stored: row_nnz}` from the files' records; None when any file has no record."""
    counts: dict[str, int] = {}
    for file in files:
        record = read_record(file)
        if record is None:
            return None
        counts.update({key: item["row_nnz"] for key, item in record["tensors"].items() if "row_nnz" in item})
    return counts


def verify_files(files: Iterable[str | os.PathLike], *, hashes: bool = True) -> VerifyResult:
    """Compare each file's tensors with its integrity record: same names, dtypes, shapes and (with `hashes`)
    sha256. Files without a record are listed in `unrecorded`; nothing raises for damage, see `problems`."""
    result = VerifyResult()
    for file in files:
        path = Path(file)
        result.files.append(str(path))
        header = read_safetensors_header(path)
        record = read_record(path, header)
        if record is None:
            result.unrecorded.append(str(path))
            continue
        tensors, recorded = _tensors(header), record["tensors"]
        for key in sorted(set(recorded) - set(tensors)):
            result.problems.append(f"Tensor `{key}` is recorded but missing from {path} (the header is damaged).")
        for key in sorted(set(tensors) - set(recorded)):
            result.problems.append(f"Tensor `{key}` in {path} is not in the file's integrity record.")
        for key in sorted(set(tensors) & set(recorded)):
            entry, item = tensors[key], recorded[key]
            if (entry["dtype"], entry["shape"]) != (item["dtype"], item["shape"]):
                result.problems.append(
                    f"Tensor `{key}` in {path} is {entry['dtype']} {entry['shape']} but was saved as "
                    f"{item['dtype']} {item['shape']} (the header is damaged)."
                )
        result.tensors += len(tensors)
        if hashes:
            digests = _digests(path, header)
            result.bytes += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in tensors.values())
            for key in sorted(set(digests) & set(recorded)):
                if digests[key] != recorded[key]["sha256"]:
                    result.problems.append(
                        f"Tensor `{key}` in {path} does not match its sha256 recorded at save: its bytes are damaged."
                    )
    return result


def start_verification(files: list[str]) -> Callable[[], None]:
    """Check a checkpoint about to load: names, dtypes and shapes now, the sha256 of every byte in a background
    thread while transformers loads the tensors; the returned function waits for it and raises on damage.

    Hashing releases the GIL, so it overlaps the load instead of adding to it (BENCHMARKS.md, "Integrity
    records"). Files without a record get a warning (saved before the records existed, or by another tool).

    Raises:
        CheckpointIntegrityError: naming the first damaged tensor and its file, and what to do (now for a header
            that disagrees with its record, from the returned function for damaged bytes).
    """
    if not verification_enabled():
        return lambda: None
    header_pass = verify_files(files, hashes=False)
    _raise_on_problems(header_pass)
    if header_pass.unrecorded:
        logger.warning(
            "%s has no integrity record (saved before optimum-oats 0.3 or by another tool): its tensors cannot be "
            "verified, only its structure. Save it again with `save_pretrained` to add records.",
            ", ".join(Path(f).name for f in header_pass.unrecorded),
        )
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = verify_files(files)
        except BaseException as error:  # re-raised in the caller's thread by `join`
            outcome["error"] = error

    thread = threading.Thread(target=work, name="oats-verify", daemon=True)
    thread.start()

    def join() -> None:
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        _raise_on_problems(outcome["result"])

    return join


def _raise_on_problems(result: VerifyResult) -> None:
    if result.problems:
        extra = f" ({len(result.problems) - 1} more problems)" if len(result.problems) > 1 else ""
        raise CheckpointIntegrityError(
            f"{result.problems[0]}{extra} The checkpoint is damaged: download or copy it again (`optimum-cli oats "
            f"verify DIR` lists every damaged tensor). To load it anyway, at your own risk, set {VERIFY_ENV}=0 or "
            "pass `oats_verify=False`."
        )
