"""Checkpoint size: bytes of SmolLM2-135M's compressed linear layers on disk vs the same layers stored dense.

Storage depends only on each layer's rank and nnz, not on solver quality, so a cheap compression (1 OATS
iteration, 4 x 128 calibration tokens) gives the exact sizes of any OATS run at the same rho and kappa.

    python benchmarks/checkpoint_size.py --rates 0.3 0.5 0.7
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from toolkit.data import data_root
from toolkit.models import load_causal_lm, load_tokenizer, safetensors_bytes, smollm2_path
from toolkit.provenance import Provenance

from optimum_oats import OATSConfig, compress

SUFFIXES = ("weight", "weight_mask", "lowrank_u", "lowrank_v")


def layer_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of compressed-layer tensors, bytes of the same layers dense in the checkpoint's dtype)."""
    layer_map = json.loads((folder / "config.json").read_text())["quantization_config"]["layer_map"]
    compressed = dense = 0
    with safe_open(folder / "model.safetensors", "pt") as handle:
        for name in layer_map:
            tensors = {suffix: handle.get_tensor(f"{name}.{suffix}") for suffix in SUFFIXES}
            compressed += sum(t.numel() * t.element_size() for t in tensors.values())
            out_features, in_features = tensors["lowrank_u"].shape[0], tensors["lowrank_v"].shape[1]
            dense += out_features * in_features * tensors["weight"].element_size()
    return compressed, dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5])
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    args = parser.parse_args()
    provenance = Provenance.start()
    data_dir = data_root()
    model_path = smollm2_path()
    tokenizer = load_tokenizer(model_path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.float32, torch.bfloat16):
            dense_dir = Path(tmp) / f"dense-{dtype}"
            load_causal_lm(model_path, dtype=dtype).save_pretrained(dense_dir)
            for rate in args.rates:
                model = load_causal_lm(model_path, dtype=dtype)
                cfg = OATSConfig(
                    compression_rate=rate,
                    rank_ratio=args.rank_ratio,
                    num_iterations=1,
                    num_samples=4,
                    seqlen=128,
                    dataset=str(data_dir / "c4" / "c4_sample.jsonl"),
                )
                compress(model, cfg, tokenizer, progress=False)
                out = Path(tmp) / f"oats-{dtype}-{rate}"
                model.save_pretrained(out)
                compressed, dense = layer_bytes(out)
                dtype_name = str(dtype).split(".")[1]
                rows.append(
                    (dtype_name, rate, compressed, dense, safetensors_bytes(out), safetensors_bytes(dense_dir))
                )
    print(f"\nrank_ratio={args.rank_ratio}; compressed layers: values + 1-bit mask + U + V (bias none in SmolLM2)\n")
    print(
        "| dtype | rho | compressed layers (MB) | same layers dense (MB) | ratio "
        "| whole checkpoint (MB) | dense checkpoint (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype, rate, compressed, dense, total, dense_total in rows:
        print(
            f"| {dtype} | {rate} | {compressed / 1e6:.1f} | {dense / 1e6:.1f} | {compressed / dense:.3f} | "
            f"{total / 1e6:.1f} | {dense_total / 1e6:.1f} |"
        )
    print(f"\n{provenance.line()}")


if __name__ == "__main__":
    main()
