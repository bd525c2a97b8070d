"""What kind of calibration data a value is (PIL images, a `datasets` dataset, texts), checked without importing
`datasets` or PIL when the value cannot be one of theirs."""

from __future__ import annotations

from typing import Any


def is_pil_image(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow ships with matplotlib, a dependency
        return False
    return isinstance(value, Image.Image)


def is_hf_dataset(value: Any) -> bool:
    """A `datasets.Dataset` or `DatasetDict` (checked without importing `datasets` when it is not loaded)."""
    module = type(value).__module__
    return module.startswith("datasets.") and type(value).__name__ in ("Dataset", "DatasetDict")


def is_image_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(is_pil_image(item) for item in value)


def dataset_split(dataset):
    """A `DatasetDict`'s calibration split: 'train' when present, else its only/first split."""
    if type(dataset).__name__ != "DatasetDict":
        return dataset
    name = "train" if "train" in dataset else next(iter(dataset))
    return dataset[name]


def is_in_memory_dataset(value: Any) -> bool:
    """Data given as objects rather than a name or path: a `datasets` dataset or a non-empty list of PIL images.
    Such values are arguments of a compression run, never settings written to config.json."""
    return is_hf_dataset(value) or (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(type(item).__module__.startswith("PIL.") for item in value)
    )
