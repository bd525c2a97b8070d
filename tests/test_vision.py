"""Vision transformers (ViT, DINOv2) calibrated on real images through their image processor.

The images are the photographs and drawings shipped in matplotlib's `mpl-data/sample_data` (matplotlib is a
dependency), copied into a temporary folder tree. Only structure and round trips are tested: the quality of a
compressed ViT cannot be measured offline (no labelled image set is available here).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForImageClassification

from optimum_oats import LinearSparseLowRank, OATSConfig, compress
from optimum_oats.data.images import load_calibration_images, sample_image_batches
from optimum_oats.data.inputs import describe_dataset
from optimum_oats.data.text import CalibrationDataError
from optimum_oats.engine.blocks import find_block_stacks, find_linear_layers
from optimum_oats.engine.capture import capture_block_inputs
from tests.helpers.tiny_encoders import build, build_image_processor, text_configs, vision_configs

CASES = [("vit", AutoModelForImageClassification), ("dinov2", AutoModel)]


@pytest.fixture(scope="module")
def sample_images() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    assert len(files) >= 3, f"matplotlib's sample images are missing from {folder}"
    return files


@pytest.fixture(scope="module")
def image_dir(sample_images, tmp_path_factory) -> Path:
    """The sample images in a small folder tree (one in a subfolder), beside a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    for index, path in enumerate(sample_images):
        shutil.copy(path, (root / "nested" if index == 0 else root) / path.name)
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def processor():
    return build_image_processor(32)


def _cfg(dataset, processor, **kwargs) -> OATSConfig:
    base = dict(dataset=dataset, image_processor=processor, num_samples=8, num_iterations=3, rank_ratio=0.2)
    return OATSConfig(**{**base, **kwargs})


def _outputs(model, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixel_values=pixel_values)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch, auto_class", CASES, ids=[arch for arch, _ in CASES])
def test_vision_model_compressed_within_budget_and_round_trip(arch, auto_class, image_dir, processor, tmp_path):
    model = build(auto_class, vision_configs()[arch])
    expected = set()
    for stack, blocks in find_block_stacks(model):
        for index, block in enumerate(blocks):
            expected |= set(find_linear_layers(block, f"{stack}.{index}"))
    outside = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in expected}
    compress(model, _cfg(str(image_dir), processor), progress=False)

    replaced = {n for n, m in model.named_modules() if isinstance(m, LinearSparseLowRank)}
    assert replaced == expected and len(replaced) == 12  # 2 blocks x (q, k, v, attention out, fc1, fc2)
    for name, weight in outside.items():  # the classification head
        assert isinstance(model.get_submodule(name), nn.Linear) and torch.equal(
            model.get_submodule(name).weight, weight
        )
    for name in replaced:
        layer = model.get_submodule(name)
        target = 0.5 * layer.in_features * layer.out_features
        assert layer.num_parameters <= target and target - layer.num_parameters < layer.out_features
        assert layer.rank > 0

    pixels = sample_image_batches(processor, load_calibration_images(str(image_dir), 3))[0]["pixel_values"]
    expected_out = _outputs(model, pixels)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"]["dataset"] == str(image_dir)
    assert "image_processor" not in saved["quantization_config"]
    assert auto_class.__name__ in saved["auto_map"]
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_outputs(reloaded, pixels), expected_out)


def test_images_from_a_folder_a_pil_list_and_datasets_agree(image_dir, sample_images, tmp_path):
    import datasets
    from PIL import Image

    files = sorted(p for p in image_dir.rglob("*") if p.suffix in (".jpg", ".png"))
    assert len(files) == len(sample_images)
    pil = [Image.open(p) for p in files]
    table = datasets.Dataset.from_dict({"label": list(range(len(files))), "picture": [str(p) for p in files]})
    table = table.cast_column("picture", datasets.Image())  # found by its feature type, whatever its name
    table.save_to_disk(tmp_path / "saved")
    sources = [str(image_dir), pil, table, datasets.DatasetDict({"train": table}), str(tmp_path / "saved")]
    loaded = [load_calibration_images(source, 2, seed=1) for source in sources]
    for images in loaded:
        assert [im.mode for im in images] == ["RGB", "RGB"]
        assert [im.tobytes() for im in images] == [im.tobytes() for im in loaded[0]]
    assert len(load_calibration_images(pil, 10)) == len(files)  # fewer than asked: all of them
    assert describe_dataset(pil).startswith(f"<{len(files)} images given in memory, sha256 ")
    assert describe_dataset(table).startswith(f"<datasets.Dataset of {len(files)} rows")


def test_compress_vit_from_pil_images_while_loading(sample_images, processor, tmp_path):
    from PIL import Image

    dense_dir, out_dir = tmp_path / "dense", tmp_path / "compressed"
    build(AutoModelForImageClassification, vision_configs()["vit"]).save_pretrained(dense_dir)
    processor.save_pretrained(dense_dir)  # no image processor given: the model folder's is used
    images = [Image.open(p).convert("RGB") for p in sample_images]
    config = OATSConfig(dataset=images, num_samples=4, num_iterations=3, rank_ratio=0.2)
    model = AutoModelForImageClassification.from_pretrained(dense_dir, quantization_config=config)
    assert isinstance(model.vit.layers[0].attention.q_proj, LinearSparseLowRank)
    assert isinstance(model.classifier, nn.Linear)
    assert config.layer_map is None and config.dataset is images  # the caller's config is left alone
    model.save_pretrained(out_dir)
    recorded = json.loads((out_dir / "config.json").read_text())["quantization_config"]["dataset"]
    assert recorded == describe_dataset(images)
    pixels = sample_image_batches(processor, images)[0]["pixel_values"]
    again = AutoModelForImageClassification.from_pretrained(out_dir)
    torch.testing.assert_close(_outputs(again, pixels), _outputs(model, pixels))


def test_image_batches_capture(image_dir, processor):
    model = build(AutoModel, vision_configs()["vit"])
    batches = sample_image_batches(processor, load_calibration_images(str(image_dir), 3), batch_size=2)
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 32, 32), (1, 3, 32, 32)]
    _, blocks = find_block_stacks(model)[0]
    captured = capture_block_inputs(model, blocks, batches)
    assert [h.shape for h in captured.hidden_states] == [(2, 17, 64), (1, 17, 64)]  # [CLS] + 4 x 4 patches
    assert all(call.token_mask is None for call in captured.block_kwargs[0])


def test_wrong_kind_of_calibration_data(image_dir, processor, tmp_path, sample_images):
    from PIL import Image

    vit = build(AutoModel, vision_configs()["vit"])
    with pytest.raises(CalibrationDataError, match="vision model calibrates on images"):
        compress(vit, _cfg("c4", processor), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="holds no image files"):
        compress(vit, _cfg(str(tmp_path / "empty"), processor), progress=False)
    bert = build(AutoModel, text_configs(100)["bert"])
    with pytest.raises(ValueError, match="holds images"):
        compress(bert, OATSConfig(dataset=[Image.open(sample_images[0])]), object(), progress=False)
    with pytest.raises(ValueError, match="non-empty list of strings or of PIL images"):
        OATSConfig(dataset=["text", Image.open(sample_images[0])])


def test_vit_model_card_names_the_image_classes(image_dir, processor):
    from huggingface_hub import ModelCard

    from optimum_oats import compression_report
    from optimum_oats.hub.card import render_model_card
    from optimum_oats.integrations.auto_classes import model_task

    model = build(AutoModelForImageClassification, vision_configs()["vit"])
    compress(model, _cfg(str(image_dir), processor, num_samples=2), progress=False)
    task = model_task("ViTForImageClassification", "vit")
    card = render_model_card(compression_report(model), base_model="google/vit-base-patch16-224", task=task)
    assert ModelCard(str(card)).data.pipeline_tag == "image-classification"
    assert "image_processor = AutoImageProcessor.from_pretrained(" in card.text
    assert "AutoModelForImageClassification.from_pretrained(" in card.text and "lm_head" not in card.text
