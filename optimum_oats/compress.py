"""`compress()`: the model traversal that joins calibration statistics to an algorithm, block by block."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from .algorithms import ALGORITHMS, INPUT_NORMS, layer_budget, outlier_ratios, owl_block_rates
from .calibration import (
    BlockInputs,
    block_forward,
    capture_block_inputs,
    collect_statistics,
    find_decoder_blocks,
    find_linear_layers,
)
from .config import OATSConfig
from .data import generate_self_texts, load_calibration_texts, sample_calibration_windows
from .integration import set_module
from .nn import LinearSparseLowRank
from .report import CompressionReport

logger = logging.getLogger(__name__)


def resolve_tokenizer(model: nn.Module, config: OATSConfig, tokenizer: Any = None):
    """The tokenizer argument, else `config.tokenizer` (object or name), else the model's own folder/repo."""
    from transformers import AutoTokenizer

    tokenizer = tokenizer if tokenizer is not None else config.tokenizer
    if tokenizer is None:
        tokenizer = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not tokenizer:
        raise ValueError(
            "A tokenizer is needed to tokenize the calibration data: pass `tokenizer=` to `compress()` "
            "or set `OATSConfig(tokenizer=...)`."
        )
    return AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer


def calibration_inputs(model: nn.Module, config: OATSConfig, tokenizer) -> torch.Tensor:
    """`(num_samples, seqlen)` token ids from `config.dataset`."""
    if config.dataset == "self":
        texts = generate_self_texts(model, tokenizer, config.num_samples * config.seqlen, seed=config.seed)
    else:
        texts = load_calibration_texts(config.dataset)
    return sample_calibration_windows(tokenizer, texts, config.num_samples, config.seqlen, seed=config.seed)


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
        local = {n[len(prefix) + 1 :]: m for n, m in find_linear_layers(block, prefix, config.is_skipped).items()}
        with collect_statistics(local, (INPUT_NORMS,)) as accumulators:
            hidden = block_forward(block, hidden, inputs.block_kwargs[index])
        scores = [m.weight.abs().float() * accumulators[n][INPUT_NORMS].finalize() for n, m in local.items()]
        ratios.append(float(outlier_ratios(scores, config.owl_threshold)))
    rates = owl_block_rates(torch.tensor(ratios), config.compression_rate, config.owl_lambda)
    logger.info("OWL outlier ratios %s -> block rates %s", [round(r, 3) for r in ratios], [round(r, 3) for r in rates])
    return rates, ratios


@torch.no_grad()
def compress_with_inputs(model: nn.Module, config: OATSConfig, input_ids: torch.Tensor, progress: bool = True):
    """Compress `model` in place from calibration token ids; returns the `layer_map`."""
    from tqdm.auto import tqdm

    blocks_name, blocks = find_decoder_blocks(model)
    # Input norms are always collected: the report's error is measured in the same D-scaled norm for every method.
    needed = tuple(dict.fromkeys((*ALGORITHMS[config.method].statistics, INPUT_NORMS)))
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, blocks, input_ids, progress=progress)
    rates, ratios = owl_rates(blocks_name, blocks, inputs, config) if config.layerwise == "owl" else (None, None)
    hidden = inputs.hidden_states
    layer_map: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(blocks), desc=f"Compressing ({config.method})", disable=not progress)
    try:
        for index, block in enumerate(blocks):
            prefix = f"{blocks_name}.{index}"
            linears = find_linear_layers(block, prefix, skip=config.is_skipped)
            local = {name[len(prefix) + 1 :]: layer for name, layer in linears.items()}
            kwargs = inputs.block_kwargs[index]
            with collect_statistics(local, needed) as accumulators:
                block_forward(block, hidden, kwargs)
            for name, linear in local.items():
                statistics = {stat: acc.finalize() for stat, acc in accumulators[name].items()}
                _check_statistics(f"{prefix}.{name}", statistics)
                layer, entry = compress_linear(linear, statistics, config, rates[index] if rates else None)
                set_module(block, name, layer)
                if ratios:
                    entry["owl_outlier_ratio"] = round(ratios[index], 6)
                layer_map[f"{prefix}.{name}"] = entry
            if index + 1 < len(blocks):
                hidden = block_forward(block, hidden, kwargs)
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return layer_map


def _check_statistics(name: str, statistics: dict[str, torch.Tensor]) -> None:
    for stat, value in statistics.items():
        if not torch.isfinite(value).all():
            raise ValueError(
                f"Calibration statistic {stat!r} of `{name}` is not finite (NaN/Inf activations). "
                "Check the model in float32 and the calibration data."
            )


def compress(
    model: nn.Module, config: OATSConfig, tokenizer: Any = None, *, progress: bool = True
) -> nn.Module:
    """Compress every linear layer of every block of `model` in place, block by block.

    Embeddings, norms and `lm_head` stay dense. The model's `config.quantization_config` is set to a copy of
    `config` whose `layer_map` records each layer's rank and nnz, so the result saves and reloads.

    Args:
        model (`PreTrainedModel`): a decoder language model.
        config ([`OATSConfig`]): what to do.
        tokenizer (*optional*): tokenizer object or name for the calibration text; defaults to
            `config.tokenizer`, then to the model's `name_or_path`.
        progress (`bool`): show progress bars.

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
    config = OATSConfig.from_dict(config.to_dict())  # never mutate the caller's config
    compress_loaded_model(model, config, tokenizer, progress=progress)
    attach_quantization_config(model, config)
    return model


def compress_loaded_model(model: nn.Module, config: OATSConfig, tokenizer: Any = None, *, progress: bool = True):
    """Calibrate and compress; fills `config.layer_map` in place (the quantizer's config object is the model's)."""
    tokenizer = resolve_tokenizer(model, config, tokenizer)
    input_ids = calibration_inputs(model, config, tokenizer)
    logger.info("Calibrating on %d windows of %d tokens", *input_ids.shape)
    if isinstance(config.dataset, list):  # keep config.json small: record what was used, not the texts themselves
        digest = hashlib.sha256("\x00".join(config.dataset).encode()).hexdigest()[:16]
        config.dataset = f"<{len(config.dataset)} texts given in memory, sha256 {digest}>"
    config.layer_map = compress_with_inputs(model, config, input_ids, progress=progress)


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
