"""Settings that cannot work for a model's shapes, refused before any data is read or any layer is compressed.

These checks need the model's structure and layer shapes but no weights, so they run on a weightless (meta device)
skeleton too: `oats compress` and `from_pretrained(quantization_config=...)` run them before the weights load,
`compress()` before calibration. Each message names the setting, the layer or model value it conflicts with, and
the fix.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from ..algorithms import layer_budget
from ..config import OATSConfig
from ..data.inputs import WINDOWS, calibration_kind
from .blocks import find_block_stacks, find_linear_layers
from .embeddings import check_embedding_plan

logger = logging.getLogger(__name__)

# Set to 1 to calibrate with `seqlen` above the model's `max_position_embeddings` (e.g. a RoPE model meant to be
# run beyond its trained length): it is a property of the run, not of the result, so it is not a config field.
FORCE_SEQLEN_ENV = "OATS_FORCE_SEQLEN"
_SHOWN = 3  # offending layers named in a message


def check_plan(model: nn.Module, config: OATSConfig) -> None:
    """Raise `ValueError` for a `seqlen`, N:M pattern or rate that cannot work on `model` (weights not needed)."""
    check_seqlen(model, config)
    check_embedding_plan(model, config)
    shapes = {
        name: (linear.out_features, linear.in_features)
        for blocks_name, blocks in find_block_stacks(model)
        for index, block in enumerate(blocks)
        for name, linear in find_linear_layers(block, f"{blocks_name}.{index}", skip=config.is_skipped).items()
    }
    if config.nm is not None:
        m = config.nm[1]
        narrow = [f"`{name}` ({d_in})" for name, (_, d_in) in shapes.items() if d_in % m]
        if narrow:
            raise ValueError(
                f"`sparsity_pattern={config.sparsity_pattern!r}` needs every compressed layer's input width "
                f"divisible by M={m}, but {len(narrow)} layers are not: {', '.join(narrow[:_SHOWN])}"
                f"{', ...' if len(narrow) > _SHOWN else ''}. Use an M that divides them (2:4 and 2:8 fit most "
                "models) or keep those layers dense with `modules_to_not_convert`."
            )
    if config.layerwise != "owl":  # OWL's per-block rates are known after calibration; checked per layer then
        for name, (d_out, d_in) in shapes.items():
            try:
                layer_budget(d_out, d_in, config.compression_rate, config.effective_rank_ratio, config.nm)
            except ValueError as error:
                raise ValueError(f"`{name}`: {error}") from error


def check_seqlen(model: nn.Module, config: OATSConfig) -> None:
    """Causal LMs calibrate on windows of exactly `seqlen` tokens: beyond the model's positions is an error."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0 or config.seqlen <= positions:
        return
    if calibration_kind(model) != WINDOWS:  # encoders cap their sequences at the model's length themselves
        return
    message = (
        f"`seqlen={config.seqlen}` is above the model's `max_position_embeddings={positions}`: calibration windows "
        "would use positions the model was never trained on, and its statistics would not be those of real use."
    )
    if os.environ.get(FORCE_SEQLEN_ENV, "").strip().lower() in ("1", "true", "yes"):
        logger.warning("%s Going on because %s is set.", message, FORCE_SEQLEN_ENV)
        return
    raise ValueError(
        f"{message} Use `seqlen` <= {positions}, or set {FORCE_SEQLEN_ENV}=1 to calibrate beyond them anyway."
    )
