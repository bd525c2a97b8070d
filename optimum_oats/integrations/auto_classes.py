"""Which transformers Auto class, Hub pipeline tag and preprocessor an architecture belongs to.

The remote-code entry point (`remote_code.py`) and the model card (`hub/card.py`) both need to name how a checkpoint
is loaded: `AutoModelForCausalLM` + `AutoTokenizer` for SmolLM2, `AutoModelForSequenceClassification` for a BERT
classifier, `AutoModelForImageClassification` + `AutoImageProcessor` for a ViT. The answer is read from
transformers' own Auto mappings, so it follows the installed version rather than a suffix guess.
"""

from __future__ import annotations

from dataclasses import dataclass

# (Auto class, its mapping in `transformers.models.auto.modeling_auto`, pipeline tag), most specific first.
_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification"),
    ("AutoModel", "MODEL_MAPPING_NAMES", "feature-extraction"),
)


@dataclass(frozen=True)
class ModelTask:
    """How a checkpoint of one architecture is loaded and labelled on the Hub."""

    auto_class: str
    pipeline_tag: str
    processor_class: str = "AutoTokenizer"

    @property
    def is_vision(self) -> bool:
        return self.processor_class == "AutoImageProcessor"


CAUSAL_LM = ModelTask("AutoModelForCausalLM", "text-generation")


def model_task(architecture: str | None, model_type: str | None) -> ModelTask | None:
    """The [`ModelTask`] of `architecture` (a class name such as `"BertForSequenceClassification"`) of
    `model_type` (`config.model_type`), or `None` when no Auto class maps to it."""
    if not architecture or not model_type:
        return None
    from transformers.models.auto import modeling_auto

    for auto_class, mapping_name, pipeline_tag in _AUTO_CLASSES:
        names = getattr(modeling_auto, mapping_name, {}).get(model_type, ())
        if architecture in ((names,) if isinstance(names, str) else tuple(names)):
            vision = _main_input_name(architecture) == "pixel_values"
            if vision and pipeline_tag == "feature-extraction":
                pipeline_tag = "image-feature-extraction"
            return ModelTask(auto_class, pipeline_tag, "AutoImageProcessor" if vision else "AutoTokenizer")
    return None


def _main_input_name(architecture: str) -> str:
    import transformers

    cls = getattr(transformers, architecture, None)
    return getattr(cls, "main_input_name", "input_ids")
