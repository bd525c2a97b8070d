"""Model-ready calibration inputs: which kind a model takes, and building them from `OATSConfig.dataset`.

Three kinds, chosen from the model itself:

* `"windows"`: causal decoder LMs get `(num_samples, seqlen)` token windows cut from a joined text stream, as
  in the SparseGPT / Wanda / OATS papers (one tensor; every window has the same length, so no padding).
* `"texts"`: encoders (BERT, RoBERTa, DeBERTa-v2) and encoder-decoders (BART, T5) get documents tokenized as
  the model sees them in use, with special tokens, truncated to the model's maximum length and batched with
  right padding; the attention mask keeps padding out of the statistics.
* `"images"`: vision transformers (`main_input_name == "pixel_values"`: ViT, DINOv2) get images passed through
  their image processor, in `pixel_values` batches.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .images import describe_images, load_calibration_images, sample_image_batches
from .kinds import dataset_split, is_hf_dataset, is_image_list
from .text import generate_self_texts, load_calibration_texts, sample_calibration_windows, sample_text_batches

logger = logging.getLogger(__name__)

WINDOWS, TEXTS, IMAGES = "windows", "texts", "images"
# The OATS paper's rank ratio for vision transformers (its LLM experiments use 0.25; `OATSConfig.rank_ratio` has
# this package's own default).
VIT_RANK_RATIO = 0.2
# `model_max_length` of tokenizers that set no limit (transformers' VERY_LARGE_INTEGER) is not a real bound.
_NO_LIMIT = 10**9


class CalibrationSettings(Protocol):
    """The settings calibration reads; `OATSConfig` has them, and this package need not import it."""

    dataset: Any
    tokenizer: Any
    image_processor: Any
    num_samples: int
    seqlen: int
    seed: int
    rank_ratio: float
    calibration_sampling: str

    @property
    def uses_low_rank(self) -> bool: ...


@dataclass
class CalibrationData:
    """What one compression run calibrates on: the data and the objects that prepare it.

    These are arguments of a run (`compress(model, cfg, tokenizer, dataset=..., image_processor=...)`), not settings:
    `OATSConfig` records only a name, a path or a digest of the data. Each defaults to the config's field (kept for
    compatibility), then to the model's own tokenizer / image processor.
    """

    dataset: Any = None
    tokenizer: Any = None
    image_processor: Any = None

    @classmethod
    def from_config(cls, config: CalibrationSettings, **overrides: Any) -> CalibrationData:
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(
            dataset=given.get("dataset", config.dataset),
            tokenizer=given.get("tokenizer", config.tokenizer),
            image_processor=given.get("image_processor", config.image_processor),
        )


def calibration_kind(model: nn.Module) -> str:
    """`"images"`, `"windows"` (causal decoder LM) or `"texts"` (encoder, encoder-decoder)."""
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return IMAGES
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return TEXTS
    causal = any(getattr(module, "is_causal", None) is True for module in model.modules())
    return WINDOWS if causal else TEXTS


def resolve_tokenizer(model: nn.Module, tokenizer: Any = None):
    """The tokenizer (object or name), else the model's own folder/repo."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        tokenizer = _model_source(model)
    if not tokenizer:
        raise ValueError(
            "A tokenizer is needed to tokenize the calibration data: pass `tokenizer=` to `compress()` "
            "or set `OATSConfig(tokenizer=...)`."
        )
    return AutoTokenizer.from_pretrained(tokenizer) if isinstance(tokenizer, str) else tokenizer


def is_image_processor(value: Any) -> bool:
    from transformers.image_processing_base import ImageProcessingMixin

    return isinstance(value, ImageProcessingMixin)


def resolve_image_processor(model: nn.Module, *candidates: Any):
    """The first usable candidate (an image processor object or name), else the model's folder/repo.

    A multimodal `ProcessorMixin` is accepted too: its `image_processor` is used.
    """
    from transformers import AutoImageProcessor

    processor = None
    for candidate in candidates:
        if candidate is not None and not is_image_processor(candidate):
            candidate = getattr(candidate, "image_processor", candidate)
        if candidate is not None and (is_image_processor(candidate) or isinstance(candidate, str)):
            processor = candidate
            break
    else:
        processor = _model_source(model)
    if not processor:
        raise ValueError(
            "An image processor is needed to prepare the calibration images: set "
            "`OATSConfig(image_processor=...)` (an `AutoImageProcessor` or its name) or pass it to `compress()`."
        )
    return AutoImageProcessor.from_pretrained(processor) if isinstance(processor, str) else processor


def _model_source(model: nn.Module) -> str | None:
    return getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)


def text_length(model: nn.Module, tokenizer, seqlen: int) -> int:
    """`seqlen`, capped by the positions the model can embed and the tokenizer's maximum length."""
    limits = [seqlen]
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        # RoBERTa-style embeddings number positions from `padding_idx + 1`, so that many fewer are usable.
        offset = max(
            (
                m.padding_idx + 1
                for m in model.modules()
                if hasattr(m, "position_embeddings") and isinstance(getattr(m, "padding_idx", None), int)
            ),
            default=0,
        )
        limits.append(positions - offset)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < _NO_LIMIT:
        limits.append(model_max)
    length = min(limits)
    if length < seqlen:
        logger.info("Calibration sequences capped at %d tokens (the model's maximum), not seqlen=%d", length, seqlen)
    return length


def calibration_inputs(
    model: nn.Module, config: CalibrationSettings, data: CalibrationData
) -> torch.Tensor | list[dict]:
    """Model-ready calibration inputs (see the module docstring for the three kinds).

    `data.tokenizer` may also hold an image processor for a vision model (the positional argument of `compress()`).
    """
    kind = calibration_kind(model)
    dataset = data.dataset
    if kind == IMAGES:
        if config.uses_low_rank and config.rank_ratio != VIT_RANK_RATIO:
            logger.info(
                "The OATS paper uses rank_ratio=%s for vision transformers (got %s)", VIT_RANK_RATIO, config.rank_ratio
            )
        processor = resolve_image_processor(model, data.tokenizer, data.image_processor)
        images = load_calibration_images(dataset, config.num_samples, seed=config.seed)
        return sample_image_batches(processor, images)
    if is_image_list(dataset) or is_hf_dataset(dataset) and "text" not in _columns(dataset):
        raise ValueError(
            f"`dataset` holds images, but {type(model).__name__} takes text; pass text (a list of strings, a "
            "local file, 'c4', 'wikitext2')."
        )
    tokenizer = resolve_tokenizer(model, data.tokenizer)
    if dataset == "self":
        if kind != WINDOWS:
            raise ValueError(
                f"`dataset='self'` uses text the model generates itself, which {type(model).__name__} (not a "
                "causal LM) cannot do; pass calibration text instead."
            )
        texts = generate_self_texts(model, tokenizer, config.num_samples * config.seqlen, seed=config.seed)
    elif is_hf_dataset(dataset):
        texts = load_calibration_texts([t for t in dataset_split(dataset)["text"] if isinstance(t, str)])
    else:
        texts = load_calibration_texts(dataset)
    if kind == WINDOWS:
        return sample_calibration_windows(
            tokenizer, texts, config.num_samples, config.seqlen, seed=config.seed, sampling=config.calibration_sampling
        )
    length = text_length(model, tokenizer, config.seqlen)
    return sample_text_batches(tokenizer, texts, config.num_samples, length, seed=config.seed)


def _columns(dataset) -> list[str]:
    return list(getattr(dataset_split(dataset), "column_names", None) or [])


def describe_inputs(inputs: torch.Tensor | list[dict]) -> str:
    """One line for the log: what the model will be calibrated on."""
    if isinstance(inputs, torch.Tensor):
        return f"{inputs.shape[0]} windows of {inputs.shape[1]} tokens"
    if inputs and "pixel_values" in inputs[0]:
        return f"{sum(len(b['pixel_values']) for b in inputs)} images in {len(inputs)} batches"
    sequences = sum(len(b["input_ids"]) for b in inputs)
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in inputs)
    return f"{sequences} sequences ({tokens} tokens, padding excluded) in {len(inputs)} batches"


def describe_dataset(dataset: Any) -> Any:
    """What `config.json` records for the calibration data: names and paths as given, in-memory data as a digest."""
    if isinstance(dataset, list) and all(isinstance(text, str) for text in dataset):
        digest = hashlib.sha256("\x00".join(dataset).encode()).hexdigest()[:16]
        return f"<{len(dataset)} texts given in memory, sha256 {digest}>"
    if is_image_list(dataset) or is_hf_dataset(dataset):
        return describe_images(dataset)
    return dataset
