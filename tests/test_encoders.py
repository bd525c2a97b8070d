"""Encoders (BERT, RoBERTa, DeBERTa-v2) and encoder-decoders (BART, T5): blocks found generically, heads left
dense, padded text batches calibrated with the padding left out, save/load, compress-on-load and the Hub."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    DebertaV2Config,
)

from optimum_oats import LinearSparseLowRank, OATSConfig, compress
from optimum_oats.algorithms import HESSIAN, INPUT_NORMS
from optimum_oats.data.inputs import IMAGES, TEXTS, WINDOWS, calibration_kind, text_length
from optimum_oats.data.text import pad_batches, sample_text_batches
from optimum_oats.engine.blocks import (
    UnsupportedArchitectureError,
    find_block_stacks,
    find_linear_layers,
    find_main_block_stack,
)
from optimum_oats.engine.capture import block_forward, capture_block_inputs
from optimum_oats.engine.statistics import collect_statistics
from optimum_oats.hub.publish import publish
from tests.helpers.tiny_encoders import build, build_wordpiece_tokenizer, text_configs, vision_configs

CASES = [
    ("bert", AutoModelForSequenceClassification),
    ("roberta", AutoModel),
    ("deberta-v2", AutoModelForSequenceClassification),
    ("bart", AutoModelForSeq2SeqLM),
    ("t5", AutoModelForSeq2SeqLM),
]


@pytest.fixture(scope="module")
def texts(calibration_texts) -> list[str]:
    """Sentences of very different lengths, so that batches are padded."""
    sentences = [s.strip() for text in calibration_texts[:40] for s in text.split(" . ") if len(s.split()) > 2]
    return sentences[:200]


@pytest.fixture(scope="module")
def wordpiece(texts):
    return build_wordpiece_tokenizer(texts)


@pytest.fixture(scope="module")
def configs(wordpiece) -> dict:
    return text_configs(len(wordpiece))


def _cfg(texts, **kwargs) -> OATSConfig:
    return OATSConfig(**{"dataset": texts, "num_samples": 10, "seqlen": 48, "num_iterations": 3, **kwargs})


def _block_linears(model) -> set[str]:
    names = set()
    for stack, blocks in find_block_stacks(model):
        for index, block in enumerate(blocks):
            names |= set(find_linear_layers(block, f"{stack}.{index}"))
    return names


def _outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _eval_batch(model, tokenizer, texts) -> dict:
    batch = dict(tokenizer(texts[:3], padding=True, truncation=True, max_length=32, return_tensors="pt"))
    if "token_type_ids" in batch and getattr(model.config, "type_vocab_size", 1) < 1:
        batch.pop("token_type_ids")
    if model.config.is_encoder_decoder:
        batch.pop("token_type_ids", None)
        batch["decoder_input_ids"] = batch["input_ids"][:, :5]
    return batch


@pytest.mark.parametrize("arch, auto_class", CASES, ids=[arch for arch, _ in CASES])
def test_every_block_linear_compressed_heads_dense_and_round_trip(
    arch, auto_class, configs, wordpiece, texts, tmp_path
):
    model = build(auto_class, configs[arch])
    expected = _block_linears(model)
    outside = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in expected}
    embeddings = model.get_input_embeddings().weight.clone()
    compress(model, _cfg(texts), wordpiece, progress=False)

    replaced = {n for n, m in model.named_modules() if isinstance(m, LinearSparseLowRank)}
    assert replaced == expected and len(replaced) >= 12
    if model.config.is_encoder_decoder:  # both stacks: self-attention, cross-attention and feed-forward
        assert any(".encoder." in n or n.startswith("encoder.") for n in replaced)
        assert sum("decoder" in n for n in replaced) == 20
    for name, weight in outside.items():  # poolers, classifiers, lm_head: untouched dense layers
        assert isinstance(model.get_submodule(name), nn.Linear)
        assert torch.equal(model.get_submodule(name).weight, weight)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    for name in replaced:
        layer = model.get_submodule(name)
        target = 0.5 * layer.in_features * layer.out_features
        assert layer.num_parameters <= target and target - layer.num_parameters < layer.out_features
    assert model.config.quantization_config.layer_map.keys() == replaced

    batch = _eval_batch(model, wordpiece, texts)
    expected_out = _outputs(model, batch)
    assert torch.isfinite(expected_out).all()
    model.save_pretrained(tmp_path)
    assert auto_class.__name__ in json.loads((tmp_path / "config.json").read_text())["auto_map"]
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    assert {n for n, m in reloaded.named_modules() if isinstance(m, LinearSparseLowRank)} == replaced
    torch.testing.assert_close(_outputs(reloaded, batch), expected_out)


def _last_block_outputs(model, stacks, batch) -> list[torch.Tensor]:
    """Each stack's last block output in the model's own forward pass."""
    from optimum_oats.engine.capture import model_inputs_for

    seen = []
    handles = [
        blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        for _, blocks in stacks
    ]
    with torch.no_grad():
        model(**model_inputs_for(model, batch))
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("arch, auto_class", [c for c in CASES if c[0] in ("bert", "deberta-v2", "bart", "t5")])
def test_block_replay_of_padded_batches_matches_the_model(arch, auto_class, configs, wordpiece, texts):
    model = build(auto_class, configs[arch])
    batches = sample_text_batches(wordpiece, texts, 6, 40, batch_size=3)
    assert any(not bool(b["attention_mask"].all()) for b in batches)  # there is padding to get right
    stacks = find_block_stacks(model)
    assert len(stacks) == (2 if model.config.is_encoder_decoder else 1)
    with torch.no_grad():
        for position, (_, blocks) in enumerate(stacks):
            captured = capture_block_inputs(model, blocks, batches)
            hidden = captured.hidden_states
            for index, block in enumerate(blocks):
                hidden = block_forward(block, hidden, captured.block_kwargs[index])
            for got, batch in zip(hidden, batches, strict=True):
                torch.testing.assert_close(got, _last_block_outputs(model, stacks, batch)[position])


def _statistics(model, batches) -> dict[str, dict[str, torch.Tensor]]:
    """Input norms and Hessians of every block linear of every stack, from the dense model."""
    result = {}
    with torch.no_grad():
        for stack, blocks in find_block_stacks(model):
            captured = capture_block_inputs(model, blocks, batches)
            hidden = captured.hidden_states
            for index, block in enumerate(blocks):
                prefix = f"{stack}.{index}"
                local = {n[len(prefix) + 1 :]: m for n, m in find_linear_layers(block, prefix).items()}
                with collect_statistics(local, (INPUT_NORMS, HESSIAN)) as accumulators:
                    hidden = block_forward(block, hidden, captured.block_kwargs[index])
                for name, stats in accumulators.items():
                    result[f"{prefix}.{name}"] = {k: acc.finalize().clone() for k, acc in stats.items()}
    return result


def _repad(batches, extra: int, pad_id: int) -> list[dict]:
    """The same batches with `extra` more padding positions on the right."""
    out = []
    for batch in batches:
        rows = batch["input_ids"].shape[0]
        fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
        out.append({k: torch.cat([v, torch.full((rows, extra), fill[k])], 1) for k, v in batch.items()})
    return out


@pytest.mark.parametrize("arch, auto_class", [c for c in CASES if c[0] in ("bert", "bart")])
def test_padding_does_not_change_the_statistics(arch, auto_class, configs, wordpiece, texts):
    model = build(auto_class, configs[arch])
    unpadded = sample_text_batches(wordpiece, texts, 6, 40, batch_size=1)
    samples = [{k: v[0].tolist() for k, v in batch.items()} for batch in unpadded]
    padded = pad_batches(samples, wordpiece.pad_token_id, batch_size=3)
    assert any(not bool(b["attention_mask"].all()) for b in padded)
    reference = _statistics(model, unpadded)
    for batches in (padded, _repad(padded, 7, wordpiece.pad_token_id)):
        got = _statistics(model, batches)
        assert got.keys() == reference.keys()
        for layer, stats in reference.items():
            for stat, value in stats.items():
                torch.testing.assert_close(got[layer][stat], value, rtol=1e-4, atol=1e-5)


def test_padding_positions_would_change_the_statistics_if_counted(configs, wordpiece, texts):
    """The control for the test above: padding positions carry real activations, so counting them shows."""
    model = build(AutoModel, configs["bert"])
    padded = _repad(sample_text_batches(wordpiece, texts, 4, 40, batch_size=2), 7, wordpiece.pad_token_id)
    _, blocks = find_block_stacks(model)[0]
    captured = capture_block_inputs(model, blocks, padded)
    every = sum(h.reshape(-1, h.shape[-1]).square().sum(0) for h in captured.hidden_states)
    counted = sum(
        h[b["attention_mask"].bool()].square().sum(0) for h, b in zip(captured.hidden_states, padded, strict=True)
    )
    assert not torch.allclose(every, counted)


def test_compress_while_loading_an_encoder(configs, wordpiece, texts, tmp_path):
    dense_dir, out_dir = tmp_path / "dense", tmp_path / "compressed"
    build(AutoModelForSequenceClassification, configs["bert"]).save_pretrained(dense_dir)
    wordpiece.save_pretrained(dense_dir)  # the tokenizer is found in the model's folder
    model = AutoModelForSequenceClassification.from_pretrained(dense_dir, quantization_config=_cfg(texts))
    assert isinstance(model.bert.encoder.layer[1].output.dense, LinearSparseLowRank)
    assert isinstance(model.classifier, nn.Linear) and isinstance(model.bert.pooler.dense, nn.Linear)
    assert model.config.quantization_config.dataset.startswith("<200 texts given in memory")
    batch = _eval_batch(model, wordpiece, texts)
    model.save_pretrained(out_dir)
    again = AutoModelForSequenceClassification.from_pretrained(out_dir)
    torch.testing.assert_close(_outputs(again, batch), _outputs(model, batch))
    # The remote-code entry point names the classifier's Auto class, not AutoModelForCausalLM.
    remote = AutoModelForSequenceClassification.from_pretrained(out_dir, trust_remote_code=True)
    assert type(remote).__name__ == "OATSBertForSequenceClassification"
    torch.testing.assert_close(_outputs(remote, batch), _outputs(model, batch))


def test_deberta_convolution_between_blocks_is_refused(configs, wordpiece, texts):
    config = DebertaV2Config(**{**configs["deberta-v2"].to_dict(), "conv_kernel_size": 3})
    model = build(AutoModel, config)
    with pytest.raises(UnsupportedArchitectureError, match="between block 0 and block 1"):
        compress(model, _cfg(texts), wordpiece, progress=False)


def test_block_stacks_and_old_names(configs, tiny_configs):
    bart = build(AutoModelForSeq2SeqLM, configs["bart"])
    assert [name for name, _ in find_block_stacks(bart)] == ["model.encoder.layers", "model.decoder.layers"]
    llama = build(AutoModelForCausalLM, tiny_configs["llama"])
    assert find_block_stacks(llama) == [find_main_block_stack(llama)]
    deberta = build(AutoModel, configs["deberta-v2"])  # no `_no_split_modules`: the longest block list
    assert [name for name, _ in find_block_stacks(deberta)] == ["encoder.layer"]


def test_calibration_kind(configs, tiny_configs):
    from transformers import AutoModelForImageClassification

    assert calibration_kind(build(AutoModelForCausalLM, tiny_configs["opt"])) == WINDOWS
    assert calibration_kind(build(AutoModel, configs["bert"])) == TEXTS
    assert calibration_kind(build(AutoModelForSeq2SeqLM, configs["t5"])) == TEXTS
    assert calibration_kind(build(AutoModelForImageClassification, vision_configs()["vit"])) == IMAGES


def test_text_length_is_capped_by_the_model(configs):
    unlimited = SimpleNamespace(model_max_length=10**30)
    assert text_length(build(AutoModel, configs["bert"]), unlimited, 2048) == 128
    # RoBERTa numbers positions from padding_idx + 1 (0 + 1 here): one position fewer than the table holds.
    assert text_length(build(AutoModel, configs["roberta"]), unlimited, 2048) == 129
    assert text_length(build(AutoModel, configs["bert"]), unlimited, 64) == 64


def test_self_generated_text_is_refused_for_encoders(configs, wordpiece):
    with pytest.raises(ValueError, match="not a causal LM"):
        compress(build(AutoModel, configs["bert"]), OATSConfig(dataset="self"), wordpiece, progress=False)


def test_text_batches_are_seeded_sorted_and_masked(wordpiece, texts):
    batches = sample_text_batches(wordpiece, texts, 10, 32, batch_size=4, seed=3)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    assert all(b["input_ids"].shape[1] <= 32 for b in batches)
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths)
    for b in batches:  # real tokens start with [CLS]; padding is [PAD] with mask 0
        assert (b["input_ids"][:, 0] == wordpiece.cls_token_id).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == wordpiece.pad_token_id).all()
    again = sample_text_batches(wordpiece, texts, 10, 32, batch_size=4, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True))


def test_encoder_publish_to_hub(hub, configs, wordpiece, texts):
    from huggingface_hub import ModelCard

    model = build(AutoModelForSequenceClassification, configs["bert"])
    compress(model, _cfg(texts, num_samples=4), wordpiece, progress=False)
    publish(model, "user/tiny-bert-oats", tokenizer=wordpiece, base_model="google-bert/bert-base-uncased")
    files = hub.repo("user/tiny-bert-oats").files()
    assert {"config.json", "model.safetensors", "oats_report.json", "README.md", "tokenizer_config.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "text-classification"
    assert 'AutoModelForSequenceClassification.from_pretrained("user/tiny-bert-oats")' in card.text
    assert "poolers and task heads" in card.text
    again = AutoModelForSequenceClassification.from_pretrained("user/tiny-bert-oats")
    batch = _eval_batch(model, wordpiece, texts)
    torch.testing.assert_close(_outputs(again, batch), _outputs(model, batch))


def test_config_keeps_text_models_unchanged(texts):
    """A list of strings still deep-copies into config.json's description; nothing image-related leaks in."""
    cfg = OATSConfig(dataset=copy.copy(texts), image_processor=object())
    assert "image_processor" not in cfg.to_dict() and cfg.to_dict()["dataset"] == texts


@pytest.mark.parametrize(
    "architecture, model_type, expected",
    [
        ("LlamaForCausalLM", "llama", ("AutoModelForCausalLM", "text-generation", "AutoTokenizer")),
        ("BertModel", "bert", ("AutoModel", "feature-extraction", "AutoTokenizer")),
        (
            "BertForSequenceClassification",
            "bert",
            ("AutoModelForSequenceClassification", "text-classification", "AutoTokenizer"),
        ),
        ("BartForConditionalGeneration", "bart", ("AutoModelForSeq2SeqLM", "text2text-generation", "AutoTokenizer")),
        (
            "ViTForImageClassification",
            "vit",
            ("AutoModelForImageClassification", "image-classification", "AutoImageProcessor"),
        ),
        ("Dinov2Model", "dinov2", ("AutoModel", "image-feature-extraction", "AutoImageProcessor")),
    ],
)
def test_model_task(architecture, model_type, expected):
    from optimum_oats.integrations.auto_classes import model_task

    task = model_task(architecture, model_type)
    assert (task.auto_class, task.pipeline_tag, task.processor_class) == expected
    assert model_task("NoSuchModel", "bert") is None and model_task(None, None) is None


def test_text_dataset_object_calibrates_an_encoder(configs, wordpiece, texts, tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    model = build(AutoModel, configs["bert"])
    compress(model, _cfg(table, num_samples=4), wordpiece, progress=False)
    assert isinstance(model.encoder.layer[0].attention.self.query, LinearSparseLowRank)
    model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["dataset"]
    assert recorded.startswith(f"<datasets.Dataset of {len(texts)} rows")
