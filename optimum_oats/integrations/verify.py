"""`oats verify DIR`: check a saved checkpoint's integrity records and the structure of every bitmask, without
loading the model, and list every problem found (loading stops at the first)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import OATSConfig
from .checkpoint import CheckpointError, MaskRule, mask_problem, mask_rules, read_safetensors_header
from .integrity import MASK_SUFFIX, CheckpointIntegrityError, read_mask, recorded_row_counts, verify_files


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """Records (sha256, dtype, shape of every tensor) and mask structure of the checkpoint in `directory`.

    Returns:
        A summary: `damaged` (bool), `problems` (each names a tensor or file), `records` (`"all"`, `"none"` or
        `"partial"`: files without records can be checked for structure only), and counts.

    Raises:
        ValueError: when `directory` is not a compressed checkpoint folder.
    """
    folder = Path(directory)
    config = _oats_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"`{folder}` holds no .safetensors file; compressed checkpoints are saved as safetensors.")
    problems: list[str] = []
    try:
        result = verify_files(files)
        problems += result.problems
        headers = {path: read_safetensors_header(path) for path in files}
    except CheckpointError as error:  # a header too damaged to read: nothing more can be checked in it
        return _summary(folder, files, [str(error)], records="unknown", tensors=0, size=0, layers=0)
    entries = {key: (path, entry) for path, header in headers.items() for key, entry in header.items()}
    problems += _index_problems(folder, entries)
    layers = _check_masks(config, entries, problems)
    records = "none" if len(result.unrecorded) == len(files) else "partial" if result.unrecorded else "all"
    return _summary(folder, files, problems, records=records, tensors=result.tensors, size=result.bytes, layers=layers)


def _oats_config(folder: Path) -> OATSConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"`{folder}` is not a checkpoint folder: it has no config.json.")
    try:
        quantization = json.loads(path.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise CheckpointError(f"{path} is not a valid JSON object ({error}).") from error
    if quantization.get("quant_method") != "oats":
        raise ValueError(f"`{folder}` is not an OATS-compressed checkpoint (config.json has no `oats` quantization).")
    return OATSConfig.from_dict(quantization)


def _index_problems(folder: Path, entries: dict[str, tuple[Path, dict]]) -> list[str]:
    """A sharded checkpoint's index must name only shards that exist and tensors they hold."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
        return [f"{index} is not a valid safetensors index (no `weight_map` object)."]
    missing = sorted({file for file in weight_map.values() if not (folder / str(file)).is_file()})
    problems = [f"Shard {file} listed in {index.name} is missing from the folder." for file in missing]
    for key, file in weight_map.items():
        if file not in missing and (key not in entries or entries[key][0].name != file):
            problems.append(f"Tensor `{key}` is listed in {index.name} under {file} but that file does not hold it.")
    return problems


def _check_masks(config: OATSConfig, entries: dict[str, tuple[Path, dict]], problems: list[str]) -> int:
    """Check each compressed layer's stored mask against its rule; returns how many layers were checked."""
    layer_map = config.layer_map or {}
    shapes, missing = {}, []
    for name in layer_map:
        mask, factor = entries.get(f"{name}{MASK_SUFFIX}"), entries.get(f"{name}.lowrank_v")
        in_features = layer_map[name].get("in_features")  # quantized layers: no float `lowrank_v` on disk
        if factor is not None and len(factor[1]["shape"]) == 2:
            in_features = factor[1]["shape"][1]
        if mask is None or in_features is None or len(mask[1]["shape"]) != 2:
            missing.append(name)
            continue
        shapes[name] = (int(in_features), mask[1]["shape"][0])
    problems += [f"Tensors of `{name}` (in config.json's `layer_map`) are missing or malformed." for name in missing]
    recorded = _recorded_rows(entries)
    kept = {name: entry for name, entry in layer_map.items() if name in shapes}
    rules = mask_rules(kept, shapes, config.method, config.nm, recorded)
    for name, (in_features, _) in shapes.items():
        path, entry = entries[f"{name}{MASK_SUFFIX}"]
        mask = read_mask(path, entry)
        problem = mask_problem(name, mask, in_features, int(layer_map[name]["nnz"]), rules.get(name, MaskRule()))
        if problem:
            problems.append(f"{problem} ({path.name})")
    return len(shapes)


def _recorded_rows(entries: dict[str, tuple[Path, dict]]) -> dict[str, int] | None:
    try:
        rows = recorded_row_counts(sorted({path for path, _ in entries.values()}))
    except CheckpointIntegrityError:
        return None
    return None if rows is None else {key.removesuffix(MASK_SUFFIX): count for key, count in rows.items()}


def _summary(folder, files, problems, *, records, tensors, size, layers) -> dict[str, Any]:
    return {
        "directory": str(folder),
        "damaged": bool(problems),
        "records": records,
        "files": [path.name for path in files],
        "tensors_hashed": tensors,
        "bytes_hashed": size,
        "layers_checked": layers,
        "problems": problems,
    }
