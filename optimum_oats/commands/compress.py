"""`oats compress MODEL --output DIR`: load a dense model, compress it, save checkpoint + tokenizer."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

CONFIG_FIELDS = (
    "compression_rate",
    "rank_ratio",
    "method",
    "sparsity_pattern",
    "dataset",
    "num_samples",
    "seqlen",
    "num_iterations",
    "seed",
    "svd",
    "layerwise",
    "owl_threshold",
    "owl_lambda",
    "modules_to_not_convert",
)


def config_from_args(args: argparse.Namespace):
    """An `OATSConfig` from the options given; options left out keep OATSConfig's defaults."""
    from optimum_oats import OATSConfig

    return OATSConfig(**{f: getattr(args, f) for f in CONFIG_FIELDS if getattr(args, f, None) is not None})


def run(args: argparse.Namespace) -> dict[str, Any]:
    from optimum_oats import compress
    from optimum_oats.hub import resolve_base_model
    from optimum_oats.report import CompressionReport

    from .runner import load_model

    config = config_from_args(args)  # validated before the (slow) model load
    model, tokenizer = load_model(args.model, args.dtype, args.device)
    start = time.perf_counter()
    compress(model, config, tokenizer)
    seconds = time.perf_counter() - start
    output = Path(args.output)
    tokenizer.save_pretrained(output)
    model.save_pretrained(output)  # staged: config.json lands last, with oats_report.json
    report = CompressionReport.from_model(model).to_dict()
    return {
        "model": args.model,
        "base_model": resolve_base_model(args.model),
        "output": str(output.resolve()),
        "method": config.method,
        "compression_rate": config.compression_rate,
        "rank_ratio": config.rank_ratio,
        "sparsity_pattern": config.sparsity_pattern,
        **report["summary"],
        "checkpoint_bytes": sum(p.stat().st_size for p in output.glob("*.safetensors")),
        "seconds": round(seconds, 2),
    }
