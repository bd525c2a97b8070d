"""The block loop: calibrate, compress and replay a model one block at a time, in place.

Each block sees the outputs of the already compressed blocks before it (as in SparseGPT, Wanda and OATS), only one
block's statistics are alive at a time, and a finished block can be saved for resuming (`resume.py`). This module
knows nothing of transformers' quantizer: marking the model as compressed is the integration's job.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algorithms import ALGORITHMS, INPUT_NORMS, outlier_ratios, owl_block_rates
from ..config import OATSConfig
from ..data.inputs import CalibrationData, calibration_inputs, describe_dataset, describe_inputs
from ..nn import LinearSparseLowRank
from ..utils.quantization import NOT_QUANTIZED
from .blocks import find_block_stacks, find_linear_layers
from .capture import BlockInputs, block_forward, capture_block_inputs, inputs_digest_tensor
from .distributed import agree, world
from .embeddings import quantize_embeddings
from .guards import refuse_shared_weights
from .layers import LayerEntry, compress_block, statistics_needed
from .offload import onload_block
from .preflight import check_plan
from .refine import refine_block
from .resume import ResumeFolder, ResumeMismatchError, job_fingerprint
from .statistics import collect_statistics

logger = logging.getLogger(__name__)

# The keys of a layer entry that reloading needs (config.json's `layer_map`); the rest go to oats_report.json.
SHAPE_KEYS = ("rank", "nnz")
# ... and, for a quantized layer only, how it is stored (absent: floats).
SKELETON_KEYS = LinearSparseLowRank.STORAGE_ARGS  # the layer constructor's storage arguments
STORAGE_KEYS = (*SKELETON_KEYS, "in_features")
LAYER_MAP_KEYS = SHAPE_KEYS + STORAGE_KEYS


@dataclass
class CompressionOutcome:
    """What a compression produced: per-layer shapes for config.json and per-layer numbers for the report."""

    layer_map: dict[str, dict[str, int]] = field(default_factory=dict)
    layer_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: Any = None  # what config.json records for the calibration data

    @classmethod
    def from_entries(cls, entries: dict[str, LayerEntry], dataset: Any = None) -> CompressionOutcome:
        return cls(
            layer_map={name: {k: int(e[k]) for k in LAYER_MAP_KEYS if k in e} for name, e in entries.items()},
            layer_stats={name: {k: v for k, v in e.items() if k not in LAYER_MAP_KEYS} for name, e in entries.items()},
            dataset=dataset,
        )


def calibrate_and_compress(
    model: nn.Module,
    config: OATSConfig,
    data: CalibrationData,
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> CompressionOutcome:
    """Build the calibration inputs from `data`, then compress every stack of blocks in place. `config` is not
    modified."""
    if config.method not in ALGORITHMS:
        raise ValueError(
            f"`method={config.method!r}` is a training-time method and cannot compress one-shot; "
            "see `optimum_oats.training.losparse` (LoSparse fine-tuning with `transformers.Trainer`)."
        )
    check_plan(model, config)  # shapes against the settings, before any data is read
    input_ids = calibration_inputs(model, config, data)
    logger.info("Calibrating on %s", describe_inputs(input_ids))
    entries = compress_with_inputs(model, config, input_ids, progress=progress, checkpoint_dir=checkpoint_dir)
    if config.embedding_bits != NOT_QUANTIZED:  # after the blocks: their calibration reads the dense embedding
        quantize_embeddings(model)
    return CompressionOutcome.from_entries(entries, dataset=describe_dataset(data.dataset))


@torch.no_grad()
def compress_with_inputs(
    model: nn.Module,
    config: OATSConfig,
    input_ids: torch.Tensor | list[dict[str, torch.Tensor]],
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict[str, LayerEntry]:
    """Compress `model` in place from calibration inputs; returns each layer's entry (shape and numbers).

    `input_ids` is `(num_samples, seqlen)` token ids or a list of model-ready batches (`data/inputs.py`). Each stack
    of blocks is compressed in turn (encoder-decoders have two, encoder first), from a fresh capture, so the
    decoder's cross-attention sees the compressed encoder. With several stacks, each resumes from its own
    subfolder of `checkpoint_dir`.
    """
    stacks = find_block_stacks(model)
    entries: dict[str, LayerEntry] = {}
    for blocks_name, blocks in stacks:
        folder = checkpoint_dir if checkpoint_dir is None or len(stacks) == 1 else Path(checkpoint_dir) / blocks_name
        entries.update(compress_stack(model, blocks_name, blocks, config, input_ids, progress, folder))
    return entries


@torch.no_grad()
def owl_rates(
    blocks_name: str, blocks: nn.ModuleList, inputs: BlockInputs, config: OATSConfig
) -> tuple[list[float], list[float]]:
    """OWL's per-block rates from the outlier ratios (%) of the *dense* model's Wanda scores (one extra pass).

    Returns `(rates, outlier_ratios)`, one entry per block."""
    ratios = []
    hidden = inputs.hidden_states
    for index, block in enumerate(blocks):
        prefix = f"{blocks_name}.{index}"
        with onload_block(block):
            local = {n[len(prefix) + 1 :]: m for n, m in find_linear_layers(block, prefix, config.is_skipped).items()}
            with collect_statistics(local, (INPUT_NORMS,)) as accumulators:
                hidden = block_forward(block, hidden, inputs.block_kwargs[index])
            scores = [m.weight.abs().float() * accumulators[n][INPUT_NORMS].finalize() for n, m in local.items()]
        ratios.append(float(outlier_ratios(scores, config.owl_threshold)))
    rates = owl_block_rates(torch.tensor(ratios), config.compression_rate, config.owl_lambda)
    logger.info("OWL outlier ratios %s -> block rates %s", [round(r, 3) for r in ratios], [round(r, 3) for r in rates])
    return rates, ratios


@torch.no_grad()
def compress_stack(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    config: OATSConfig,
    input_ids: torch.Tensor | list[dict[str, torch.Tensor]],
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> dict[str, LayerEntry]:
    """Compress one stack of blocks in place from calibration inputs; returns its layers' entries.

    With `checkpoint_dir`, each finished block is saved there and a restarted job continues after the last one
    (`resume.py`). Under an initialised `torch.distributed` the layers of each block are split across ranks
    (`distributed.py`). Blocks offloaded by accelerate are brought to their execution device one at a time
    (`offload.py`).
    """
    from tqdm.auto import tqdm

    refuse_shared_weights(model, blocks_name, blocks, config.is_skipped)
    needed = statistics_needed(config.method)
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, blocks, input_ids, progress=progress)
    rates, ratios = owl_rates(blocks_name, blocks, inputs, config) if config.layerwise == "owl" else (None, None)
    hidden = inputs.hidden_states
    resume, saved, start = None, None, 0
    if checkpoint_dir is not None:
        calibration = inputs_digest_tensor(input_ids)
        fingerprint = job_fingerprint(config.to_dict(), model, calibration, inputs.hidden_states[0])
        resume = ResumeFolder(checkpoint_dir, fingerprint, len(blocks), writer=world()[0] == 0)
        saved = resume.load()
        start = agree(saved.completed if saved else 0)  # ranks that see different folders all start afresh
        if saved and start:
            hidden = [h.to(device=inputs.hidden_states[0].device) for h in saved.hidden_states or ()]
    entries: dict[str, LayerEntry] = {}
    undone = 0  # blocks whose refinement raised their calibration loss and was reverted
    bar = tqdm(total=len(blocks), initial=start, desc=f"Compressing ({config.method})", disable=not progress)
    try:
        for index, block in enumerate(blocks):
            prefix = f"{blocks_name}.{index}"
            with onload_block(block) as onloaded:
                linears = find_linear_layers(block, prefix, skip=config.is_skipped)
                local = {name[len(prefix) + 1 :]: layer for name, layer in linears.items()}
                if index < start:
                    entries.update(_restore_block(onloaded, prefix, local, resume, saved.layer_map, index))
                    continue
                kwargs = inputs.block_kwargs[index]
                with collect_statistics(local, needed) as accumulators:
                    dense_outputs = block_forward(block, hidden, kwargs)
                compressed = compress_block(prefix, local, accumulators, config, rates[index] if rates else None)
                block_entries = {}
                for name, (layer, entry) in compressed.items():
                    onloaded.replace(name, layer)
                    if ratios:
                        entry["owl_outlier_ratio"] = round(ratios[index], 6)
                    block_entries[f"{prefix}.{name}"] = entry
                if config.refine_steps:
                    layers = {name: layer for name, (layer, _) in compressed.items()}
                    before, after = refine_block(
                        block,
                        layers,
                        hidden,
                        kwargs,
                        dense_outputs,
                        steps=config.refine_steps,
                        lr=config.refine_lr,
                        lowrank_lr=config.refine_lowrank_lr,
                        progress=progress,
                    )
                    undone += after == before
                del dense_outputs
                entries.update(block_entries)
                if index + 1 < len(blocks):
                    hidden = block_forward(block, hidden, kwargs)
                    for layer, _ in compressed.values():  # a long calibration window may have built a dense
                        layer.release_caches()  # cache ("merged"); every block would stay dense in memory
                if resume is not None:
                    layers = {name: layer for name, (layer, _) in compressed.items()}
                    resume.save_block(index, layers, block_entries, hidden if index + 1 < len(blocks) else None)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if undone:
        rate = "by block rate" if config.refine_lr is None else f"{config.refine_lr:g}"
        logger.warning(
            "Block refinement raised the calibration loss of %d of %d blocks (refine_lr %s) and was undone there; "
            "a lower `refine_lr` may refine them.",
            undone,
            len(blocks) - start,
            rate,
        )
    return entries


def _restore_block(onloaded, prefix: str, linears: dict[str, nn.Linear], resume, saved_map: dict, index: int):
    """Put block `index`'s saved compressed layers in place; returns their entries in block order."""
    tensors = resume.load_block(index)
    entries = {}
    for name, linear in linears.items():
        entry = saved_map.get(f"{prefix}.{name}")
        if entry is None:
            raise ResumeMismatchError(
                f"The resume folder {resume.directory} has no saved layer `{prefix}.{name}`; delete it to start over."
            )
        storage = {k: entry[k] for k in SKELETON_KEYS if k in entry}
        layer = LinearSparseLowRank.skeleton_of(linear, entry["rank"], entry["nnz"], **storage)
        layer.load_state_dict({key[len(name) + 1 :]: t for key, t in tensors.items() if key.startswith(name + ".")})
        onloaded.replace(name, layer)
        entries[f"{prefix}.{name}"] = entry
    return entries
