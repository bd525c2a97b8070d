"""`compress()`: the model traversal that joins calibration statistics to an algorithm, block by block."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .algorithms import ALGORITHMS, INPUT_NORMS, layer_budget, outlier_ratios, owl_block_rates
from .calibration import (
    BlockInputs,
    block_forward,
    capture_block_inputs,
    collect_statistics,
    find_block_stacks,
    find_linear_layers,
    inputs_digest_tensor,
)
from .config import OATSConfig
from .distributed import agree, assign_layers, share_layers, world
from .guards import check_finite_weight, refuse_shared_weights
from .inputs import calibration_inputs, describe_dataset, describe_inputs, resolve_tokenizer  # noqa: F401
from .nn import LinearSparseLowRank
from .offload import onload_block
from .report import CompressionReport
from .resume import ResumeFolder, ResumeMismatchError, job_fingerprint

logger = logging.getLogger(__name__)


def relative_error(weight: torch.Tensor, approx: torch.Tensor, input_norms: torch.Tensor | None) -> float:
    """`||(W - Ŵ) D||_F / ||W D||_F`, the output-space error OATS minimises (plain Frobenius without D)."""
    weight = weight.float()
    scale = input_norms.float() if input_norms is not None else torch.ones(weight.shape[1], device=weight.device)
    return float(((weight - approx.float()) * scale).norm() / (weight * scale).norm().clamp_min(1e-30))


@torch.no_grad()
def compress_linear(
    linear: nn.Linear, statistics: dict[str, torch.Tensor], config: OATSConfig, compression_rate: float | None = None
):
    """Compress one layer at `compression_rate` (default: the config's); returns it and its `layer_map` entry."""
    algorithm = ALGORITHMS[config.method]
    rate = config.compression_rate if compression_rate is None else compression_rate
    d_out, d_in = linear.weight.shape
    budget = layer_budget(d_out, d_in, rate, config.effective_rank_ratio, config.nm)
    decomposition = algorithm.run(linear.weight, statistics, budget, config)
    layer = LinearSparseLowRank.from_linear(
        linear, decomposition.sparse, decomposition.lowrank_u, decomposition.lowrank_v
    )
    error = relative_error(linear.weight, layer.to_dense(), statistics.get(INPUT_NORMS))
    entry = {"rank": layer.rank, "nnz": layer.sparse_nnz, "relative_error": round(error, 6)}
    if config.nm is None:
        entry["compression_rate"] = round(rate, 6)
    return layer, entry


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
def compress_with_inputs(
    model: nn.Module,
    config: OATSConfig,
    input_ids: torch.Tensor | list[dict[str, torch.Tensor]],
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
):
    """Compress `model` in place from calibration inputs; returns the `layer_map`.

    `input_ids` is `(num_samples, seqlen)` token ids or a list of model-ready batches (`inputs.py`). Each stack
    of blocks is compressed in turn (encoder-decoders have two, encoder first), from a fresh capture, so the
    decoder's cross-attention sees the compressed encoder. With several stacks, each resumes from its own
    subfolder of `checkpoint_dir`.
    """
    stacks = find_block_stacks(model)
    layer_map: dict[str, dict[str, Any]] = {}
    for blocks_name, blocks in stacks:
        folder = checkpoint_dir if checkpoint_dir is None or len(stacks) == 1 else Path(checkpoint_dir) / blocks_name
        layer_map.update(compress_stack(model, blocks_name, blocks, config, input_ids, progress, folder))
    return layer_map


@torch.no_grad()
def compress_stack(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    config: OATSConfig,
    input_ids: torch.Tensor | list[dict[str, torch.Tensor]],
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
):
    """Compress one stack of blocks in place from calibration inputs; returns its `layer_map` entries.

    With `checkpoint_dir`, each finished block is saved there and a restarted job continues after the last one
    (`resume.py`). Under an initialised `torch.distributed` the layers of each block are split across ranks
    (`distributed.py`). Blocks offloaded by accelerate are brought to their execution device one at a time
    (`offload.py`).
    """
    from tqdm.auto import tqdm

    refuse_shared_weights(model, blocks_name, blocks, config.is_skipped)
    # Input norms are always collected: the report's error is measured in the same D-scaled norm for every method.
    needed = tuple(dict.fromkeys((*ALGORITHMS[config.method].statistics, INPUT_NORMS)))
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
    layer_map: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(blocks), initial=start, desc=f"Compressing ({config.method})", disable=not progress)
    try:
        for index, block in enumerate(blocks):
            prefix = f"{blocks_name}.{index}"
            with onload_block(block) as onloaded:
                linears = find_linear_layers(block, prefix, skip=config.is_skipped)
                local = {name[len(prefix) + 1 :]: layer for name, layer in linears.items()}
                if index < start:
                    layer_map.update(_restore_block(onloaded, prefix, local, resume, saved.layer_map, index))
                    continue
                kwargs = inputs.block_kwargs[index]
                with collect_statistics(local, needed) as accumulators:
                    block_forward(block, hidden, kwargs)
                compressed = compress_block(prefix, local, accumulators, config, rates[index] if rates else None)
                entries = {}
                for name, (layer, entry) in compressed.items():
                    onloaded.replace(name, layer)
                    if ratios:
                        entry["owl_outlier_ratio"] = round(ratios[index], 6)
                    entries[f"{prefix}.{name}"] = entry
                layer_map.update(entries)
                if index + 1 < len(blocks):
                    hidden = block_forward(block, hidden, kwargs)
                    for layer, _ in compressed.values():  # drop the dense cache a "merged"/"auto" forward builds,
                        layer.set_execution_mode(layer.execution_mode)  # or every block would stay dense in memory
                if resume is not None:
                    layers = {name: layer for name, (layer, _) in compressed.items()}
                    resume.save_block(index, layers, entries, hidden if index + 1 < len(blocks) else None)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return layer_map


def compress_block(
    prefix: str,
    linears: dict[str, nn.Linear],
    accumulators: dict[str, dict],
    config: OATSConfig,
    compression_rate: float | None = None,
) -> dict[str, tuple[LinearSparseLowRank, dict[str, Any]]]:
    """Compress a block's layers from their collected statistics: `{name: (layer, layer_map entry)}` in order.

    Under `torch.distributed` each rank computes its share of the layers and receives the others' results.
    """
    rank, world_size = world()
    shapes = {name: tuple(linear.weight.shape) for name, linear in linears.items()}
    owners = assign_layers(shapes, world_size) if world_size > 1 else None
    results = {}
    for name, linear in linears.items():
        statistics = {stat: acc.finalize() for stat, acc in accumulators[name].items()}
        check_finite_weight(f"{prefix}.{name}", linear.weight)
        _check_statistics(f"{prefix}.{name}", statistics)
        if owners is None or owners[name] == rank:
            results[name] = compress_linear(linear, statistics, config, compression_rate)
    return share_layers(linears, owners, results) if owners is not None else results


def _restore_block(onloaded, prefix: str, linears: dict[str, nn.Linear], resume, saved_map: dict, index: int):
    """Put block `index`'s saved compressed layers in place; returns their `layer_map` entries in block order."""
    tensors = resume.load_block(index)
    entries = {}
    for name, linear in linears.items():
        entry = saved_map.get(f"{prefix}.{name}")
        if entry is None:
            raise ResumeMismatchError(
                f"The resume folder {resume.directory} has no saved layer `{prefix}.{name}`; delete it to start over."
            )
        layer = LinearSparseLowRank.skeleton_of(linear, entry["rank"], entry["nnz"])
        layer.load_state_dict({key[len(name) + 1 :]: t for key, t in tensors.items() if key.startswith(name + ".")})
        onloaded.replace(name, layer)
        entries[f"{prefix}.{name}"] = entry
    return entries


def _check_statistics(name: str, statistics: dict[str, torch.Tensor]) -> None:
    for stat, value in statistics.items():
        if not torch.isfinite(value).all():
            raise ValueError(
                f"Calibration statistic {stat!r} of `{name}` is not finite (NaN/Inf activations). "
                "Check the model in float32 and the calibration data."
            )


def compress(
    model: nn.Module,
    config: OATSConfig,
    tokenizer: Any = None,
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Compress every linear layer of every block of `model` in place, block by block.

    Only linear layers inside the repeated blocks are compressed: embeddings, norms, poolers and task heads
    (`lm_head`, `classifier`, ...) stay dense. The model's `config.quantization_config` is set to a copy of
    `config` whose `layer_map` records each layer's rank and nnz, so the result saves and reloads.

    Args:
        model (`PreTrainedModel`): a decoder LM, an encoder (BERT, DeBERTa-v2, ViT, ...) or an encoder-decoder
            (BART, T5); see docs/encoders.md.
        config ([`OATSConfig`]): what to do.
        tokenizer (*optional*): tokenizer object or name for the calibration text (an image processor for vision
            models); defaults to `config.tokenizer` (`config.image_processor`), then to the model's `name_or_path`.
        progress (`bool`): show progress bars.
        checkpoint_dir (`str` or `os.PathLike`, *optional*): a folder where each finished block is saved, so that a
            killed job restarted with the same arguments continues after the last finished block and gives the
            same result as an uninterrupted run (see docs/scaling.md). It is a property of the run, not of the
            result, so it is an argument here rather than an `OATSConfig` field (which would be saved in
            config.json).

    Under `torchrun` (an initialised `torch.distributed`), the layers of each block are split across ranks and every
    rank returns the full compressed model. Models offloaded by accelerate (`device_map` with `"cpu"`/`"disk"`)
    are compressed one block at a time on the execution device.

    Returns:
        The same model object, compressed.

    Example:
    ```python
    >>> model = compress(model, OATSConfig(compression_rate=0.5, dataset="c4"), tokenizer)
    >>> CompressionReport.from_model(model).kept_fraction
    ```
    """
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ValueError("This model is already quantized or compressed; compress the dense model instead.")
    if isinstance(config, dict):
        config = OATSConfig.from_dict(config)
    if not isinstance(config, OATSConfig):
        raise TypeError(f"`config` must be an OATSConfig, got {type(config).__name__}.")
    tokenizer = tokenizer if tokenizer is not None else config.tokenizer
    # Never mutate the caller's config; the image processor, like the tokenizer, is not serialized.
    config = OATSConfig.from_dict(config.to_dict(), image_processor=config.image_processor)
    compress_loaded_model(model, config, tokenizer, progress=progress, checkpoint_dir=checkpoint_dir)
    attach_quantization_config(model, config)
    return model


def compress_loaded_model(
    model: nn.Module,
    config: OATSConfig,
    tokenizer: Any = None,
    *,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
):
    """Calibrate and compress; fills `config.layer_map` in place (the quantizer's config object is the model's)."""
    if config.method not in ALGORITHMS:
        raise ValueError(
            f"`method={config.method!r}` is a training-time method and cannot compress one-shot; "
            "see `optimum_oats.losparse` (LoSparse fine-tuning with `transformers.Trainer`)."
        )
    input_ids = calibration_inputs(model, config, tokenizer)
    logger.info("Calibrating on %s", describe_inputs(input_ids))
    config.dataset = describe_dataset(config.dataset)  # config.json records what was used, not the data itself
    config.layer_map = compress_with_inputs(model, config, input_ids, progress=progress, checkpoint_dir=checkpoint_dir)


def attach_quantization_config(model: nn.Module, config: OATSConfig) -> None:
    """Mark `model` as OATS-compressed the way transformers marks quantized models, so it saves and reloads."""
    from .quantizer import OATSHfQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = OATSHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method


def compression_report(model: nn.Module) -> CompressionReport:
    """The [`CompressionReport`] of a compressed model."""
    return CompressionReport.from_model(model)
