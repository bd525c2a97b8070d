"""`OATSHfQuantizer`: lifecycle glue between `from_pretrained` and the compression engine."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from transformers.quantizers.base import HfQuantizer

from .config import OATSConfig
from .integration import checkpoint_key_renamer, replace_with_dense, replace_with_skeletons
from .serialization import check_loaded_masks, validate_checkpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


class OATSHfQuantizer(HfQuantizer):
    """Compress after the dense weights load (as GPTQ calibrates), or rebuild compressed layers before a
    compressed checkpoint loads, from the per-layer shapes recorded in `config.layer_map`."""

    requires_calibration = False
    quantization_config: OATSConfig

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files=None, **kwargs) -> None:
        if self.pre_quantized:
            shapes = replace_with_skeletons(model, self.quantization_config)
            if checkpoint_files:
                layer_map = self.quantization_config.layer_map
                validate_checkpoint(checkpoint_files, layer_map, shapes, rename=checkpoint_key_renamer(model))

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs) -> None:
        if self.pre_quantized:
            check_loaded_masks(model)
            return
        from .compress import compress_loaded_model

        # Work on a copy: the caller's config object may be reused for another `from_pretrained`.
        config = OATSConfig.from_dict(
            self.quantization_config.to_dict(), image_processor=self.quantization_config.image_processor
        )
        compress_loaded_model(model, config, self.quantization_config.tokenizer)
        self.quantization_config = model.config.quantization_config = config
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
        (recovery fine-tuning, `optimum_oats.recovery`); the mask is a buffer and never changes."""
        return True
