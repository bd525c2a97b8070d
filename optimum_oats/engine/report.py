"""The compression report: per layer rank, nnz, kept fraction, and the numbers the compression measured.

Shapes come from the model's compact layers; the measured numbers (reconstruction error, OWL rate and outlier ratio,
kept rows) come from the compression run, held on the model as `oats_layer_stats` and saved in `oats_report.json`
beside the weights, so the report is the same whether the model was just compressed or reloaded from disk.
config.json's `layer_map` holds only what reloading needs (`rank`, `nnz`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from torch import nn

from ..nn import LinearSparseLowRank
from ..utils.counting import counted_parameters
from ..utils.files import atomic_write_json

logger = logging.getLogger(__name__)

REPORT_FILE = "oats_report.json"
# The model attribute holding `{module: {measured number: value}}` from the compression run.
LAYER_STATS_ATTR = "oats_layer_stats"


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    rank: int
    nnz: int
    kept_fraction: float
    relative_error: float | None
    compression_rate: float | None = None
    owl_outlier_ratio: float | None = None
    kept_rows: int | None = None
    stored_bits: int | None = None  # values, mask, scales and factors as stored (bias excluded)

    @property
    def num_parameters(self) -> int:
        return counted_parameters(self.nnz, self.rank, self.in_features, self.out_features)


# Per-layer numbers a run measures (every LayerReport field that is not derived from the layer itself).
STAT_FIELDS = ("relative_error", "compression_rate", "owl_outlier_ratio", "kept_rows")


@dataclass
class CompressionReport:
    """What a compression kept and lost, layer by layer."""

    config: dict[str, Any]
    layers: list[LayerReport]

    @property
    def dense_parameters(self) -> int:
        return sum(layer.in_features * layer.out_features for layer in self.layers)

    @property
    def kept_parameters(self) -> int:
        return sum(layer.num_parameters for layer in self.layers)

    @property
    def kept_fraction(self) -> float:
        return self.kept_parameters / max(1, self.dense_parameters)

    @property
    def bits_per_weight(self) -> float | None:
        """All stored bits of the compressed layers (values, mask, scales, factors) over their dense weight count."""
        if not self.layers or any(layer.stored_bits is None for layer in self.layers):
            return None
        return sum(layer.stored_bits for layer in self.layers) / max(1, self.dense_parameters)

    @property
    def mean_relative_error(self) -> float | None:
        errors = [layer.relative_error for layer in self.layers if layer.relative_error is not None]
        return sum(errors) / len(errors) if errors else None

    def __str__(self) -> str:
        return render_report(self)

    def __repr__(self) -> str:
        return (
            f"CompressionReport(layers={len(self.layers)}, kept_fraction={self.kept_fraction:.4f}, "
            f"mean_relative_error={_fmt(self.mean_relative_error)})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "summary": {
                "compressed_layers": len(self.layers),
                "dense_parameters": self.dense_parameters,
                "kept_parameters": self.kept_parameters,
                "kept_fraction": self.kept_fraction,
                "bits_per_weight": self.bits_per_weight,
                "mean_relative_error": self.mean_relative_error,
            },
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionReport:
        known = {f.name for f in fields(LayerReport)}
        layers = [LayerReport(**{k: v for k, v in layer.items() if k in known}) for layer in data.get("layers", [])]
        return cls(config=dict(data.get("config", {})), layers=layers)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `oats_report.json` into `directory`, atomically."""
        return atomic_write_json(Path(directory) / REPORT_FILE, self.to_dict())

    @classmethod
    def from_model(cls, model: nn.Module) -> CompressionReport:
        config = model.config.quantization_config
        stats = layer_stats(model)
        layers = []
        for name, module in model.named_modules():
            if isinstance(module, LinearSparseLowRank):
                entry = stats.get(name, {})
                layers.append(
                    LayerReport(
                        name=name,
                        in_features=module.in_features,
                        out_features=module.out_features,
                        rank=module.rank,
                        nnz=module.sparse_nnz,
                        kept_fraction=module.num_parameters / (module.in_features * module.out_features),
                        stored_bits=module.stored_bits,
                        **{key: entry.get(key) for key in STAT_FIELDS},
                    )
                )
        return cls(config={k: v for k, v in config.to_dict().items() if k != "layer_map"}, layers=layers)


def layer_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The measured per-layer numbers of a compressed model (empty when unknown, e.g. loaded without its report)."""
    return getattr(model, LAYER_STATS_ATTR, None) or {}


def read_layer_stats(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """`{module: {number: value}}` from an `oats_report.json`.

    The report is informational (loading needs only config.json and the weights), so a damaged or hand-edited one
    is never a reason to refuse a checkpoint: what cannot be read is dropped with one warning naming the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return _unreadable(path, f"it is not readable JSON ({type(err).__name__}: {err})")
    layers = data.get("layers", []) if isinstance(data, dict) else None
    if not isinstance(layers, list):
        found = type(data).__name__ if not isinstance(data, dict) else f"`layers` of type {type(layers).__name__}"
        return _unreadable(path, f"it holds {found}, not an object with a `layers` list")
    stats, skipped = {}, 0
    for layer in layers:
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str)):
            skipped += 1
            continue
        numbers = {k: layer[k] for k in STAT_FIELDS if layer.get(k) is not None}
        good = {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        skipped += len(numbers) != len(good)
        stats[layer["name"]] = good
    if skipped:
        logger.warning(
            "%s: %d layer entries are malformed and were ignored; the checkpoint loads, but its report shows "
            "fewer measured numbers. Save the model again to rewrite the report.",
            path,
            skipped,
        )
    return stats


def _unreadable(path: Path, why: str) -> dict[str, dict[str, Any]]:
    logger.warning(
        "Ignoring %s: %s. The checkpoint loads without it (it only holds the per-layer numbers measured while "
        "compressing); save the model again to rewrite it.",
        path,
        why,
    )
    return {}


# The text form must fit a terminal: at most this many block rows (the rest are summarised in one line).
MAX_BLOCK_ROWS = 40
MAX_NAME_WIDTH = 70  # 70 + the five number columns stay within 120 characters
_INDEX = re.compile(r"\.(\d+)\.")


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _group_rows(groups: dict[str, list[LayerReport]], width: int) -> list[str]:
    rows = []
    for key, layers in groups.items():
        dense = sum(layer.in_features * layer.out_features for layer in layers)
        kept = sum(layer.num_parameters for layer in layers)
        ranks = sorted({layer.rank for layer in layers})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        rates = [layer.compression_rate for layer in layers]
        rows.append(
            f"{key[-width:]:<{width}} {len(layers):>6} {rank:>9} {kept / max(1, dense):>6.3f} "
            f"{_fmt(_mean(rates), '.3f'):>6} {_fmt(_mean([layer.relative_error for layer in layers])):>9}"
        )
    return rows


def render_report(report: CompressionReport) -> str:
    """A short summary and two small tables (by layer kind, by block) that fit a terminal; `to_dict()` has it all.

    Layers are grouped by their name with the block index removed (`model.layers.*.self_attn.q_proj`), and by
    block index, so a 30-block model prints ~45 lines however many layers it has.
    """
    config = report.config
    settings = ", ".join(
        f"{key}={config[key]}"
        for key in ("method", "compression_rate", "rank_ratio", "sparsity_pattern", "owl")
        if config.get(key) is not None
    )
    lines = [
        f"CompressionReport: {len(report.layers)} compressed layers ({settings})",
        f"  kept parameters {report.kept_parameters:,} of {report.dense_parameters:,} "
        f"({report.kept_fraction:.2%}), mean relative error {_fmt(report.mean_relative_error)}",
    ]
    if report.bits_per_weight is not None:
        lines.append(
            f"  stored bits per weight of the compressed layers {report.bits_per_weight:.3f} (dense bf16: 16)"
        )
    if config.get("embedding_bits") == 8:
        lines.append("  token embedding (and the LM head tied to it): int8 rows, one fp16 scale per row")
    if not report.layers:
        return "\n".join(lines)
    by_kind: dict[str, list[LayerReport]] = defaultdict(list)
    by_block: dict[str, list[LayerReport]] = defaultdict(list)
    for layer in report.layers:
        by_kind[_INDEX.sub(".*.", layer.name, count=1)].append(layer)
        match = _INDEX.search(layer.name)
        by_block[f"block {match.group(1)}" if match else "other"].append(layer)
    width = min(MAX_NAME_WIDTH, max(len("By layer kind"), *(len(key) for key in by_kind)))
    columns = f"{'layers':>6} {'rank':>9} {'kept':>6} {'rate':>6} {'rel.err':>9}"
    lines += ["", f"{'By layer kind':<{width}} {columns}", *_group_rows(by_kind, width)]
    block_rows = _group_rows(by_block, width)
    if len(block_rows) > MAX_BLOCK_ROWS:
        half = MAX_BLOCK_ROWS // 2
        hidden = len(block_rows) - 2 * half
        block_rows = [*block_rows[:half], f"... {hidden} blocks not shown (see .to_dict()) ...", *block_rows[-half:]]
    lines += ["", f"{'By block':<{width}} {columns}", *block_rows]
    lines += ["", "Per-layer numbers: report.to_dict()['layers']; saved as oats_report.json."]
    return "\n".join(lines)
