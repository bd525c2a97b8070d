"""`compress()`: the public entry point for a model already in memory.

It runs the engine (`engine/loop.py`) and then marks the model as compressed the way transformers marks quantized
models (`integrations/transformers.py`), so that it saves, reloads and publishes.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .config import OATSConfig
from .data.inputs import CalibrationData
from .engine.loop import calibrate_and_compress
from .engine.preflight import check_plan
from .engine.report import CompressionReport
from .integrations.transformers import mark_compressed


def compress(
    model: nn.Module,
    config: OATSConfig,
    tokenizer: Any = None,
    *,
    dataset: Any = None,
    image_processor: Any = None,
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
            models); defaults to `config.tokenizer`, then to the model's `name_or_path`.
        dataset (*optional*): calibration data given as objects (a list of strings or PIL images, a
            `datasets.Dataset`); defaults to `config.dataset`. Only a description of it is written to config.json.
        image_processor (*optional*): prepares calibration images for vision models; defaults to
            `config.image_processor`, then to the model's own.
        progress (`bool`): show progress bars.
        checkpoint_dir (`str` or `os.PathLike`, *optional*): a folder where each finished block is saved, so that a
            killed job restarted with the same arguments continues after the last finished block and gives the
            same result as an uninterrupted run (see docs/scaling.md). It is a property of the run, not of the
            result, so it is an argument here rather than an `OATSConfig` field.

    Under `torchrun` (an initialised `torch.distributed`), the layers of each block are split across ranks and every
    rank returns the full compressed model. Models offloaded by accelerate (`device_map` with `"cpu"`/`"disk"`)
    are compressed one block at a time on the execution device.

    Returns:
        The same model object, compressed.

    Example:
    ```python
    >>> model = compress(model, OATSConfig(compression_rate=0.5, dataset="c4"), tokenizer)
    >>> compression_report(model).kept_fraction
    ```
    """
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        raise ValueError("This model is already quantized or compressed; compress the dense model instead.")
    if isinstance(config, dict):
        config = OATSConfig.from_dict(config)
    if not isinstance(config, OATSConfig):
        raise TypeError(f"`config` must be an OATSConfig, got {type(config).__name__}.")
    data = CalibrationData.from_config(config, dataset=dataset, tokenizer=tokenizer, image_processor=image_processor)
    outcome = calibrate_and_compress(model, config, data, progress=progress, checkpoint_dir=checkpoint_dir)
    mark_compressed(model, config, outcome)
    return model


def compression_report(model: nn.Module) -> CompressionReport:
    """The [`CompressionReport`] of a compressed model: per layer rank, nnz, kept fraction and error."""
    return CompressionReport.from_model(model)


def check_before_loading(model_name_or_path: str, config: OATSConfig) -> None:
    """Refuse settings that cannot work on a model (N:M width, a rate that keeps nothing, `seqlen` beyond its
    positions, an unsupported architecture) from its config.json alone, before its weights are loaded.

    The model is built on the meta device (no memory, no weights), so this takes a fraction of a second where the
    load and calibration it spares can take minutes.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(model_name_or_path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    check_plan(skeleton, config)
