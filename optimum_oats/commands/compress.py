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
    "hessian_iterations",
    "hessian_shrinkage",
    "seed",
    "calibration_sampling",
    "svd",
    "layerwise",
    "owl_threshold",
    "owl_lambda",
    "refine_steps",
    "refine_lr",
    "refine_lowrank_lr",
    "value_bits",
    "group_size",
    "lowrank_bits",
    "modules_to_not_convert",
)


def config_from_args(args: argparse.Namespace):
    """An `OATSConfig` from the options given; options left out keep OATSConfig's defaults."""
    from optimum_oats.config import OATSConfig

    return OATSConfig(**{f: getattr(args, f) for f in CONFIG_FIELDS if getattr(args, f, None) is not None})


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compress and save; under `torchrun` every rank compresses its share of each block and rank 0 saves."""
    from optimum_oats.compress import check_before_loading, compress
    from optimum_oats.engine.report import CompressionReport
    from optimum_oats.hub.card import resolve_base_model

    from .runner import load_model, resolve_model_source

    config = config_from_args(args)  # validated before the (slow) model load
    check_before_loading(resolve_model_source(args.model), config)  # and against the model's shapes
    rank, device = _setup_distributed(getattr(args, "device", None))
    if getattr(args, "offload_folder", None):
        model, tokenizer = _load_offloaded(args.model, args.dtype, device, args.offload_folder)
    else:
        model, tokenizer = load_model(args.model, args.dtype, device)
    start = time.perf_counter()
    compress(model, config, tokenizer, checkpoint_dir=getattr(args, "resume_dir", None))
    seconds = time.perf_counter() - start
    output = Path(args.output)
    if rank == 0:
        tokenizer.save_pretrained(output)
        model.save_pretrained(output)  # staged: config.json lands last, with oats_report.json
    _barrier()
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


def _setup_distributed(device: str | None) -> tuple[int, str | None]:
    """Under `torchrun` (WORLD_SIZE > 1): join the process group (NCCL on GPU, gloo on CPU); returns
    `(rank, device)` with the device of this rank's GPU."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    from .runner import resolve_device

    device = resolve_device(device)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), device


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _load_offloaded(name: str, dtype: str, device: str | None, offload_folder: str):
    """Tokenizer and model with every block offloaded to `offload_folder`; the rest on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_oats.engine.offload import offloading_device_map

    from .runner import resolve_device, resolve_model_source

    source = resolve_model_source(name)
    device_map = offloading_device_map(source, resolve_device(device), "disk")
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, device_map=device_map, offload_folder=offload_folder
    )
    return model.eval(), AutoTokenizer.from_pretrained(source)
