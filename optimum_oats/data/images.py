"""Calibration images for vision transformers (ViT, DINOv2): where they come from and how they become
`pixel_values` batches.

A vision model is calibrated on images passed through its own image processor (resize, crop, normalise), exactly
as it sees them in use. Accepted sources: a list of PIL images, a folder of image files (searched recursively), a
single image file, a `datasets.Dataset` with an image column (e.g. from `load_dataset("imagefolder", ...)`), or a
folder written by `Dataset.save_to_disk`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any

import torch

from .kinds import dataset_split, is_hf_dataset, is_image_list
from .text import CALIBRATION_BATCH_SIZE, CalibrationDataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
# Column names tried, in order, when a dataset has no column typed `datasets.Image`.
_IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")


def image_column(dataset) -> str:
    """The column holding images: the first typed `datasets.Image`, else a conventional name."""
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in _IMAGE_COLUMNS:
        if name in dataset.column_names:
            return name
    raise CalibrationDataError(
        f"The dataset has no image column (columns: {dataset.column_names}). Cast one with "
        "`dataset.cast_column(name, datasets.Image())` or name it 'image'."
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _chosen(count: int, num_samples: int, seed: int) -> list[int]:
    """`num_samples` distinct indices out of `count`, in a seeded random order."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    if count < num_samples:
        logger.warning("The calibration images number %d instead of the %d requested.", count, num_samples)
    return order[:num_samples]


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise CalibrationDataError(f"Calibration image {path} cannot be read ({error}).") from error


def load_calibration_images(dataset: Any, num_samples: int, seed: int = 0) -> list:
    """Resolve `OATSConfig.dataset` to at most `num_samples` RGB PIL images, chosen in a seeded random order."""
    if is_image_list(dataset):
        return [dataset[i].convert("RGB") for i in _chosen(len(dataset), num_samples, seed)]
    if is_hf_dataset(dataset):
        split = dataset_split(dataset)
        column = image_column(split)
        return [split[i][column].convert("RGB") for i in _chosen(len(split), num_samples, seed)]
    if isinstance(dataset, (str, os.PathLike)):
        path = Path(dataset)
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            return [_open(path)]
        if path.is_dir():
            if _is_saved_dataset(path):
                import datasets

                return load_calibration_images(datasets.load_from_disk(str(path)), num_samples, seed)
            files = _image_files(path)
            if not files:
                raise CalibrationDataError(
                    f"The folder {path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})."
                )
            return [_open(files[i]) for i in _chosen(len(files), num_samples, seed)]
    raise CalibrationDataError(
        f"A vision model calibrates on images, but `dataset={_short(dataset)}` is none of: a list of PIL images, "
        "a folder of image files, an image file, a `datasets.Dataset` with an image column, or a folder saved "
        "with `Dataset.save_to_disk`."
    )


def sample_image_batches(
    image_processor, images: list, *, batch_size: int = CALIBRATION_BATCH_SIZE
) -> list[dict[str, torch.Tensor]]:
    """`images` through the model's image processor, `batch_size` at a time: `[{"pixel_values": (b, 3, H, W)}]`."""
    batches = []
    for start in range(0, len(images), batch_size):
        processed = image_processor(images=images[start : start + batch_size], return_tensors="pt")
        batches.append({"pixel_values": processed["pixel_values"]})
    return batches


def describe_images(dataset: Any) -> str:
    """A short, JSON-friendly record of in-memory calibration images for `config.json` (never the pixels)."""
    if is_hf_dataset(dataset):
        split = dataset_split(dataset)
        return f"<datasets.Dataset of {len(split)} rows, fingerprint {getattr(split, '_fingerprint', 'unknown')}>"
    digest = hashlib.sha256()
    for image in dataset:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return f"<{len(dataset)} images given in memory, sha256 {digest.hexdigest()[:16]}>"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"<{type(value).__name__}>"
