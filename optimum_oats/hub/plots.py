"""`plot_layer_report`: one PNG showing, layer by layer, what a compression kept and what it cost.

Drawn on a bare `matplotlib.figure.Figure` with the Agg canvas, never through `pyplot`: no global backend switch,
no display needed, and nothing left open in the caller's process.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..engine.report import CompressionReport, LayerReport

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def as_report(report: CompressionReport | dict[str, Any]) -> CompressionReport:
    """Accept a `CompressionReport` or its `to_dict()` form (the content of `oats_report.json`)."""
    if isinstance(report, CompressionReport):
        return report
    if not isinstance(report, dict) or "layers" not in report:
        raise TypeError("`report` must be a CompressionReport or the dict of an `oats_report.json`.")
    known = {f.name for f in fields(LayerReport)}  # tolerate reports written by newer versions
    layers = [LayerReport(**{k: v for k, v in layer.items() if k in known}) for layer in report["layers"]]
    return CompressionReport(config=dict(report.get("config", {})), layers=layers)


def sparse_density(layer: LayerReport) -> float:
    """Fraction of the weight matrix held by the sparse term."""
    return layer.nnz / max(1, layer.in_features * layer.out_features)


def plot_layer_report(report: CompressionReport | dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG of per-layer rank, sparse density and relative error to `path`; returns the path.

    Layers are in model order and coloured by projection (`q_proj`, `down_proj`, ...), with a faint line between
    decoder blocks, so a layer type or depth that compresses badly stands out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    report = as_report(report)
    layers = report.layers
    kinds = list(dict.fromkeys(layer.name.rsplit(".", 1)[-1] for layer in layers))
    palette = {kind: f"C{i % 10}" for i, kind in enumerate(kinds)}
    colors = [palette[layer.name.rsplit(".", 1)[-1]] for layer in layers]
    x = list(range(len(layers)))
    panels = (
        ("rank", [layer.rank for layer in layers]),
        ("sparse density", [sparse_density(layer) for layer in layers]),
        ("relative error", [layer.relative_error if layer.relative_error is not None else 0.0 for layer in layers]),
    )

    fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True)
    boundaries = _block_boundaries(layers)
    for ax, (label, values) in zip(axes, panels, strict=True):
        ax.bar(x, values, color=colors, width=0.9)
        ax.set_ylabel(label)
        for boundary in boundaries:
            ax.axvline(boundary - 0.5, color="0.85", linewidth=0.6, zorder=0)
    axes[-1].set_xlabel("layer (model order)")
    handles = [_legend_patch(palette[kind]) for kind in kinds]
    fig.legend(handles, kinds, loc="outside right upper", fontsize="small")
    method = report.config.get("method", "oats")
    fig.suptitle(f"{method}: kept {report.kept_fraction:.1%} of {report.dense_parameters:,} parameters")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _block_boundaries(layers: list[LayerReport]) -> list[int]:
    boundaries, previous = [], None
    for index, layer in enumerate(layers):
        match = _BLOCK_INDEX.search(layer.name)
        block = match.group(1) if match else None
        if previous is not None and block != previous:
            boundaries.append(index)
        previous = block
    return boundaries


def _legend_patch(color: str):
    from matplotlib.patches import Patch

    return Patch(color=color)
