"""`OATSHfQuantizer`: lifecycle glue between `from_pretrained` and the compression engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.quantizers.base import HfQuantizer

from ..config import OATSConfig
from ..data.inputs import CalibrationData
from ..engine.embeddings import embedding_skeletons
from ..engine.loop import LAYER_MAP_KEYS, CompressionOutcome, calibrate_and_compress
from ..engine.preflight import check_plan
from ..engine.report import LAYER_STATS_ATTR, REPORT_FILE, read_layer_stats
from ..nn import decode_quantized_layers
from ..utils.quantization import NOT_QUANTIZED
from .checkpoint import check_loaded_masks, mask_rules, release_checkpoint_mapping, validate_checkpoint
from .integrity import MASK_SUFFIX, CheckpointIntegrityError, recorded_row_counts, start_verification
from .layer_swap import checkpoint_key_renamer, replace_with_dense, replace_with_skeletons

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def settings_of(config: OATSConfig, outcome: CompressionOutcome) -> OATSConfig:
    """The config a compressed model records: `config`'s settings (never its tokenizer, processor or in-memory
    data) with what was calibrated on and the per-layer shapes. The caller's config object is not modified."""
    dataset = outcome.dataset if outcome.dataset is not None else config.dataset
    settings = OATSConfig.from_dict({**config.to_dict(), "dataset": dataset, "layer_map": outcome.layer_map})
    return settings


class OATSHfQuantizer(HfQuantizer):
    """Compress after the dense weights load (as GPTQ calibrates), or rebuild compressed layers before a
    compressed checkpoint loads, from the per-layer shapes recorded in `config.layer_map`."""

    requires_calibration = False
    quantization_config: OATSConfig

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None, **kwargs) -> None:
        if not self.pre_quantized:
            check_plan(model, self.quantization_config)  # on the weightless skeleton: fails before the load
            return
        stats = split_legacy_layer_map(self.quantization_config)
        shapes = replace_with_skeletons(model, self.quantization_config)
        tables = embedding_skeletons(model) if self.quantization_config.embedding_bits != NOT_QUANTIZED else {}
        if checkpoint_files:
            config, rename = self.quantization_config, checkpoint_key_renamer(model)
            self._stored_dtypes = validate_checkpoint(
                checkpoint_files, config.layer_map, shapes, rename=rename, other_tensors=tables
            )
            self._join_verification = start_verification(checkpoint_files)
            try:
                rows = recorded_row_counts(checkpoint_files)
            except CheckpointIntegrityError:  # an unreadable record, loaded anyway with `oats_verify=False`
                rows = None
            if rows is not None:
                rows = {rename(key).removesuffix(MASK_SUFFIX): count for key, count in rows.items()}
            self._mask_rules = mask_rules(config.layer_map, shapes, config.method, config.nm, rows)
            report = Path(checkpoint_files[0]).parent / REPORT_FILE
            if report.is_file():
                for name, numbers in read_layer_stats(report).items():
                    stats[name] = {**stats.get(name, {}), **numbers}
        setattr(model, LAYER_STATS_ATTR, stats)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> None:
        if self.pre_quantized:
            getattr(self, "_join_verification", lambda: None)()  # damaged bytes are named before structure
            check_loaded_masks(model, getattr(self, "_mask_rules", None))
            release_checkpoint_mapping(model, getattr(self, "_stored_dtypes", {}))
            decode_quantized_layers(model)
            return
        data = CalibrationData.from_config(self.quantization_config)
        outcome = calibrate_and_compress(model, self.quantization_config, data)
        # The caller's config object may be reused for another `from_pretrained`: the model records a copy.
        self.quantization_config = model.config.quantization_config = settings_of(self.quantization_config, outcome)
        setattr(model, LAYER_STATS_ATTR, dict(outcome.layer_stats))
        self.pre_quantized = True

    def _dequantize(self, model: PreTrainedModel, dtype=None) -> PreTrainedModel:
        return replace_with_dense(model)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """The compact layers hold real parameters (kept values, U, V), so `Trainer` may fine-tune them directly
        (recovery fine-tuning, `optimum_oats.training.recovery`); the mask is a buffer and never changes."""
        return True


def split_legacy_layer_map(config: OATSConfig) -> dict[str, dict]:
    """Checkpoints written before 0.2 kept per-layer numbers (errors, OWL ratios, kept rows) in `layer_map`: move
    them out, so the loaded config holds shapes only; returns them as layer stats."""
    stats = {}
    for name, entry in (config.layer_map or {}).items():
        extra = {k: v for k, v in entry.items() if k not in LAYER_MAP_KEYS}
        if extra:
            stats[name] = extra
            config.layer_map[name] = {k: entry[k] for k in LAYER_MAP_KEYS if k in entry}
    return stats
