"""The on-disk layout of compressed layers, and the checks run on a checkpoint before any tensor is loaded.

Per compressed module `<name>` the safetensors files hold:

| key                   | dtype          | shape                          |
|-----------------------|----------------|--------------------------------|
| `<name>.weight`       | model float    | `(nnz,)` kept values of S, row-major |
| `<name>.weight_mask`  | uint8          | `(out_features, ceil(in_features / 8))` packed bitmask |
| `<name>.lowrank_u`    | model float    | `(out_features, rank)`         |
| `<name>.lowrank_v`    | model float    | `(rank, in_features)`          |
| `<name>.bias`         | model float    | `(out_features,)` when present |

A quantized module (`value_bits` / `lowrank_bits` below 16 in its `layer_map` entry) stores codes and scales instead
of the float tensors it quantizes (`utils/quantization.py`, `nn/sparse_lowrank.py`):

| key                         | dtype | shape                                                  |
|-----------------------------|-------|--------------------------------------------------------|
| `<name>.weight_codes`       | uint8 | `(ceil(nnz · value_bits / 8),)` packed codes, row-major |
| `<name>.weight_scales`      | int16 | `(out_features, ceil(in_features / group_size))` fp16 bits |
| `<name>.lowrank_u_codes`    | uint8 | `(ceil(out_features · rank · lowrank_bits / 8),)`      |
| `<name>.lowrank_u_scales`   | int16 | `(out_features, ceil(rank / group_size))`              |
| `<name>.lowrank_v_codes`    | uint8 | `(ceil(rank · in_features · lowrank_bits / 8),)`       |
| `<name>.lowrank_v_scales`   | int16 | `(rank, ceil(in_features / group_size))`               |

`config.json`'s `quantization_config.layer_map` records `rank` and `nnz` per module (and `value_bits`,
`lowrank_bits`, `group_size` for a quantized one), so the skeleton is built with the right shapes before loading.
Each file's safetensors metadata holds its integrity record (`integrity.py`).
Checkpoints are read through safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..algorithms.registry import method_info
from ..nn import LinearSparseLowRank, QuantizedEmbedding
from ..nn.packing import group_counts, packed_columns, padding_bits, row_counts
from ..utils.quantization import packed_bytes

_HEADER_LENGTH_BYTES = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A compressed checkpoint is truncated, corrupted, or disagrees with its config."""


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without reading tensor data.

    Raises:
        CheckpointError: naming the file, when the header is unreadable or the data is shorter than declared.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw_length = handle.read(_HEADER_LENGTH_BYTES)
        if len(raw_length) < _HEADER_LENGTH_BYTES:
            raise CheckpointError(f"{path} is truncated: {size} bytes, too short to hold a safetensors header.")
        (length,) = struct.unpack("<Q", raw_length)
        if length > min(_MAX_HEADER_BYTES, size - _HEADER_LENGTH_BYTES):
            raise CheckpointError(
                f"{path} is corrupted or truncated: it declares a {length}-byte header in {size} bytes."
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} has a corrupted safetensors header ({error}).") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupted safetensors header (not a JSON object).")
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    for key, entry in tensors.items():
        if not _valid_entry(entry):
            raise CheckpointError(f"{path} has a corrupted safetensors header: the entry of `{key}` is malformed.")
    data_bytes = size - _HEADER_LENGTH_BYTES - length
    end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    if end > data_bytes:
        raise CheckpointError(
            f"{path} is truncated: its header declares {end} bytes of tensor data but the file holds {data_bytes}. "
            "Download or copy the checkpoint again."
        )
    return header


def _valid_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    offsets, shape, dtype = entry.get("data_offsets"), entry.get("shape"), entry.get("dtype")
    valid = (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
        and isinstance(shape, list)
        and all(isinstance(d, int) and d >= 0 for d in shape)
        and isinstance(dtype, str)
    )
    if not valid or dtype not in _DTYPE_BITS:
        return valid
    return offsets[1] - offsets[0] == math.prod(shape) * _DTYPE_BITS[dtype] // 8  # an altered dtype, shape or offset


# Bits per element of safetensors' dtypes (a dtype not listed is left to safetensors itself).
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
}  # fmt: skip


def expected_shapes(
    name: str,
    in_features: int,
    out_features: int,
    rank: int,
    nnz: int,
    value_bits: int = 16,
    lowrank_bits: int = 16,
    group_size: int = 128,
) -> dict[str, tuple]:
    shapes = {f"{name}.weight_mask": (out_features, packed_columns(in_features))}
    parts = {"weight": ((nnz,), (out_features, in_features), value_bits)}
    parts["lowrank_u"] = ((out_features, rank), (out_features, rank), lowrank_bits if rank else 16)
    parts["lowrank_v"] = ((rank, in_features), (rank, in_features), lowrank_bits if rank else 16)
    for part, (shape, (rows, cols), bits) in parts.items():
        if bits >= 16:
            shapes[f"{name}.{part}"] = shape
        else:
            shapes[f"{name}.{part}_codes"] = (packed_bytes(math.prod(shape), bits),)
            shapes[f"{name}.{part}_scales"] = (rows, -(-cols // group_size))
    return shapes


def validate_checkpoint(
    files: Iterable[str | os.PathLike],
    layer_map: dict[str, dict[str, Any]],
    layer_shapes: dict[str, tuple[int, int]],
    rename: Callable[[str], str] | None = None,
    other_tensors: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, str]:
    """Check every file's integrity and that each compressed tensor has the shape `layer_map` promises.

    Returns the stored safetensors dtype (`"F32"`, `"BF16"`, ...) of each compressed module's values, for
    [`release_checkpoint_mapping`].

    Args:
        files: the checkpoint's safetensors files.
        layer_map: `{module: {"rank", "nnz"}}` from the saved config.
        layer_shapes: `{module: (in_features, out_features)}` from the model skeleton.
        rename: maps a key as stored on disk to the model's parameter name (transformers renames the keys of
            some architectures on load, e.g. ViT's `attention.attention.key` to `attention.k_proj`).
        other_tensors: `{key: shape}` of further tensors the config promises (the int8 embedding's codes, scales).
    """
    found: dict[str, tuple[tuple, str]] = {}
    stored: dict[str, str] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(
                f"{file} is not a safetensors file; compressed checkpoints are read as safetensors only."
            )
        for key, entry in read_safetensors_header(file).items():
            if key != "__metadata__":
                found[rename(key) if rename else key] = (tuple(entry["shape"]), str(file))
                stored[rename(key) if rename else key] = entry["dtype"]
    for name, entry in layer_map.items():
        in_features, out_features = layer_shapes[name]
        storage = {key: int(entry[key]) for key in ("value_bits", "lowrank_bits", "group_size") if key in entry}
        shapes = expected_shapes(name, in_features, out_features, int(entry["rank"]), int(entry["nnz"]), **storage)
        for key, shape in shapes.items():
            _check_stored(found, key, shape, "`layer_map`", f"lists `{name}`")
    for key, shape in (other_tensors or {}).items():
        _check_stored(found, key, shape, "`embedding_bits`", "promises it")
    # Quantized values have no float tensor on disk; their codes share the file's mapping with the float tensors
    # around them (embeddings, norms), so such a layer reports the file's float dtype.
    floats = [dtype for dtype in stored.values() if dtype in STORED_DTYPES]
    common = max(set(floats), key=floats.count) if floats else None
    dtypes = {name: stored.get(f"{name}.weight", common) for name in layer_map}
    return {name: dtype for name, dtype in dtypes.items() if dtype is not None}


def _check_stored(found: dict[str, tuple[tuple, str]], key: str, shape: tuple, field: str, promise: str) -> None:
    """Raise `CheckpointError` when `key` is not stored, or stored with another shape than config.json's `field`
    implies."""
    if key not in found:
        raise CheckpointError(
            f"Tensor `{key}` is missing from the checkpoint but config.json's {field} {promise}. "
            "The checkpoint is incomplete or does not belong to this config."
        )
    if found[key][0] != tuple(shape):
        raise CheckpointError(
            f"Tensor `{key}` in {found[key][1]} has shape {list(found[key][0])} but config.json's {field} implies "
            f"{list(shape)}. The checkpoint and its config disagree."
        )


# safetensors' float dtype names, for the values of compressed layers.
STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def release_checkpoint_mapping(model: Any, stored_dtypes: dict[str, str]) -> int:
    """Copy out the bitmask (and the value codes and scales of a quantized layer) of every layer whose checkpoint
    floats were converted on load (an fp32 checkpoint loaded in bf16).

    safetensors memory-maps the file and a tensor loaded without conversion stays a view of the mapping; the
    uint8 masks are never converted, so a few MB of mask views kept the whole mapping alive, and with it every page
    of fp32 values read during the conversion: +487 MB resident for SmolLM2-135M in bf16, more than the model.
    Quantized codes and scales are integers too, and did the same. When the floats themselves are views of the file
    (no conversion), the mapping is the storage and stays.

    Returns:
        The number of layers whose integer tensors were copied.
    """
    copied = 0
    for name, module in model.named_modules():
        stored = STORED_DTYPES.get(stored_dtypes.get(name, ""))
        if not isinstance(module, LinearSparseLowRank) or stored is None or module.weight.device.type != "cpu":
            continue
        if str(module.weight.dtype).removeprefix("torch.") != stored:
            # A new tensor, not `.data =`: a view keeps its base (the mapped file) alive through its view metadata.
            for key, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and not buffer.is_floating_point() and buffer.numel():
                    setattr(module, key, buffer.detach().clone())
            copied += 1
    # An int8 embedding has no float tensor either: when the file's floats were converted, its codes and scales
    # are the last views of the mapping (+~85 MB resident on SmolLM2-135M, fp32 file loaded in bf16).
    stored = {STORED_DTYPES.get(dtype) for dtype in stored_dtypes.values()} - {None}
    for module in model.modules():
        if isinstance(module, QuantizedEmbedding) and module.weight.device.type == "cpu":
            if stored and str(module.weight.dtype).removeprefix("torch.") not in stored:
                module.weight_codes = module.weight_codes.detach().clone()
                module.weight_scales = module.weight_scales.detach().clone()
    return copied


@dataclass(frozen=True)
class MaskRule:
    """What a layer's bitmask must satisfy beyond its total count.

    Args:
        row_nnz: every row keeps exactly this many weights (None: rows may differ).
        nm: `(n, m)`: at most `n` kept weights in each group of `m` consecutive columns (None: unstructured).
    """

    row_nnz: int | None = None
    nm: tuple[int, int] | None = None


def mask_rules(
    layer_map: dict[str, dict[str, Any]],
    layer_shapes: dict[str, tuple[int, int]],
    method: str,
    nm: tuple[int, int] | None,
    recorded_row_nnz: dict[str, int] | None = None,
) -> dict[str, MaskRule]:
    """The rule each compressed layer's mask must follow, from the saved config and the integrity records.

    N:M checkpoints keep at most N per group (a kept value that is exactly 0 is dropped at save, so "exactly N"
    is not guaranteed). Per-row counts come from the records written at save (`recorded_row_nnz`, the counts
    observed, so zeros dropped and masks folded from PEFT are described as they are). A checkpoint without records
    gets them from its method: OATS and Wanda keep `nnz / out_features` per row, checked only when every layer's
    `nnz` divides evenly (a dropped zero leaves a remainder, and then no row count is promised).

    Args:
        layer_map: `{module: {"rank", "nnz"}}` from the saved config.
        layer_shapes: `{module: (in_features, out_features)}` from the model skeleton.
        method, nm: the config's `method` and N:M pattern.
        recorded_row_nnz: `{module: kept per row}` from the records, or None for a checkpoint without them.
    """
    if recorded_row_nnz is None:
        balanced = nm is None and method_info(method).rows_balanced
        if balanced and all(int(e["nnz"]) % layer_shapes[name][1] == 0 for name, e in layer_map.items()):
            recorded_row_nnz = {name: int(e["nnz"]) // layer_shapes[name][1] for name, e in layer_map.items()}
        else:
            recorded_row_nnz = {}
    return {name: MaskRule(row_nnz=recorded_row_nnz.get(name), nm=nm) for name in layer_map}


def check_loaded_masks(model: Any, rules: dict[str, MaskRule] | None = None) -> None:
    """After the tensors load: each bitmask must be one the compression could have written.

    Always on and cheap (a popcount of each mask): no padding bit set, as many kept weights as `weight` holds
    values, and the per-row or N:M counts of `rules`. Damage that keeps the total (a bit moved within a byte or to
    another row, a byte with 4 set bits inverted) would otherwise scatter the kept values to wrong places with no
    error; the integrity records catch any change, these checks hold even where records are absent or not checked.

    Raises:
        CheckpointError: naming the `weight_mask` tensor and the row.
    """
    rules = rules or {}
    for name, module in model.named_modules():
        if not isinstance(module, LinearSparseLowRank) or module.weight_mask.device.type == "meta":
            continue
        _check_mask(name, module, rules.get(name, MaskRule()))


def _check_mask(name: str, module: LinearSparseLowRank, rule: MaskRule) -> None:
    problem = mask_problem(name, module.weight_mask, module.in_features, module.sparse_nnz, rule)
    if problem:
        raise CheckpointError(
            f"{problem} The checkpoint is damaged; run `optimum-cli oats verify DIR`, then download or copy it again."
        )


def mask_problem(name: str, mask: torch.Tensor, in_features: int, nnz: int, rule: MaskRule) -> str | None:
    """What is wrong with module `name`'s packed bitmask, or None: padding bits, total, per-row and N:M counts."""
    key = f"`{name}.weight_mask`"
    padded = padding_bits(mask, in_features).nonzero()
    if len(padded):
        return (
            f"Tensor {key} has bits set past column {in_features} (the padding of row {int(padded[0])}), "
            "which are always 0."
        )
    counts = row_counts(mask)
    ones = int(counts.sum())
    if ones != nnz:
        return f"Tensor {key} marks {ones} kept weights but `{name}.weight` holds {nnz} values (padding included)."
    if rule.row_nnz is not None:
        uneven = (counts != rule.row_nnz).nonzero()
        if len(uneven):
            row = int(uneven[0])
            return (
                f"Tensor {key} keeps {int(counts[row])} weights in row {row} but every row of this layer keeps "
                f"{rule.row_nnz}."
            )
    if rule.nm is not None and in_features % rule.nm[1] == 0:
        n, m = rule.nm
        groups = group_counts(mask, in_features, m)
        over = (groups > n).nonzero()
        if len(over):
            row, group = (int(i) for i in over[0])
            return (
                f"Tensor {key} keeps {int(groups[row, group])} weights in columns {group * m}-{group * m + m - 1} of "
                f"row {row}, more than the {n}:{m} pattern allows."
            )
    return None
