"""The compression report: per layer rank, nnz, kept fraction and reconstruction error.

It is derived from the model and `config.layer_map` alone, so it is the same whether the model was just
compressed or reloaded from disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

REPORT_FILE = "oats_report.json"


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

    @property
    def num_parameters(self) -> int:
        return self.nnz + self.rank * (self.in_features + self.out_features)


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
    def mean_relative_error(self) -> float | None:
        errors = [layer.relative_error for layer in self.layers if layer.relative_error is not None]
        return sum(errors) / len(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "summary": {
                "compressed_layers": len(self.layers),
                "dense_parameters": self.dense_parameters,
                "kept_parameters": self.kept_parameters,
                "kept_fraction": self.kept_fraction,
                "mean_relative_error": self.mean_relative_error,
            },
            "layers": [asdict(layer) for layer in self.layers],
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `oats_report.json` into `directory` (atomically: temp file, then rename)."""
        path = Path(directory) / REPORT_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_model(cls, model: nn.Module) -> CompressionReport:
        from .nn import LinearSparseLowRank

        config = model.config.quantization_config
        layer_map = config.layer_map or {}
        layers = []
        for name, module in model.named_modules():
            if isinstance(module, LinearSparseLowRank):
                entry = layer_map.get(name, {})
                layers.append(
                    LayerReport(
                        name=name,
                        in_features=module.in_features,
                        out_features=module.out_features,
                        rank=module.rank,
                        nnz=module.sparse_nnz,
                        kept_fraction=module.num_parameters / (module.in_features * module.out_features),
                        relative_error=entry.get("relative_error"),
                        compression_rate=entry.get("compression_rate"),
                    )
                )
        return cls(config={k: v for k, v in config.to_dict().items() if k != "layer_map"}, layers=layers)
