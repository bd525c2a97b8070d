"""LoSparse under the real `transformers.Trainer`: schedule, global pruning, accumulation, resume, export."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from optimum_oats import LinearSparseLowRank, OATSConfig
from optimum_oats.training.losparse import (
    LoSparseCallback,
    LoSparseConfig,
    apply_losparse,
    export_losparse,
    losparse_layers,
    remaining_ratio,
)
from optimum_oats.training.recovery import token_windows
from tests.helpers.tiny_models import build_tiny_model

STEPS = 12
IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])


def _config(**kwargs) -> LoSparseConfig:
    base = dict(low_rank_ratio=0.1, final_remaining_ratio=0.3, initial_warmup_steps=2, final_warmup_steps=4, delta_t=2)
    base.update(kwargs)
    return LoSparseConfig(**base)


@pytest.fixture(scope="module")
def train_data(tokenizer, data_dir):
    return token_windows(tokenizer, (data_dir / "wikitext2" / "wiki.valid.raw").read_text()[:30000], 32)


def _kept_fraction(model) -> float:
    layers = losparse_layers(model).values()
    return sum(m.kept_rows * m.in_features for m in layers) / sum(m.out_features * m.in_features for m in layers)


class _Recorder(TrainerCallback):
    """Records the kept fraction of S after every optimizer step (`kept[i]` after 0-based step i)."""

    def __init__(self):
        self.kept = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.kept.append(_kept_fraction(model))


def _train(tiny_configs, data, tmp_path, *, batch=4, accumulation=1, steps=STEPS, resume=None, restore=True, **kw):
    model = build_tiny_model(tiny_configs["llama"])
    config = _config(total_steps=STEPS)  # a run stopped early (steps < STEPS) is the first half of the schedule
    apply_losparse(model, config)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        max_steps=steps,
        lr_scheduler_type="constant",
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
        restore_callback_states_from_checkpoint=restore,
        **kw,
    )
    recorder = _Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LoSparseCallback(config), recorder])
    trainer.train(resume_from_checkpoint=resume)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LoSparseCallback))
    return model, callback, recorder


@pytest.fixture(scope="module")
def trained(tiny_configs, train_data, tmp_path_factory):
    return _train(tiny_configs, train_data, tmp_path_factory.mktemp("losparse"), save_strategy="no")


def test_remaining_ratio_follows_the_schedule_with_one_global_threshold(trained):
    model, callback, recorder = trained
    layers = losparse_layers(model)
    max_row = max(m.in_features for m in layers.values())
    total = sum(m.out_features * m.in_features for m in layers.values())
    assert callback.step == STEPS
    # No pruning during warm-up (0-based steps 0..t_i) nor before the first mask step; then the schedule is tracked.
    assert recorder.kept[:4] == [1.0] * 4
    for step in (4, 6, 8, 9, 10, 11):  # mask steps: step % ΔT == 0 while decaying, every step in the final phase
        target = remaining_ratio(step, STEPS, 2, 4, 0.3)
        assert target * total - 1e-6 <= recorder.kept[step] * total < target * total + max_row, step
    assert recorder.kept[-1] == pytest.approx(0.3, abs=max_row / total)
    # One global threshold: layers end with different kept fractions, and every kept row scores above it.
    fractions = {name: m.kept_rows / m.out_features for name, m in layers.items()}
    assert len(set(fractions.values())) > 2
    scores = callback.scores()
    for name, layer in layers.items():
        assert (scores[name][layer.row_mask] >= callback.threshold).all()
        assert (layer.weight[~layer.row_mask] == 0).all()


def test_gradient_accumulation_scores_once_per_optimizer_step(tiny_configs, train_data, tmp_path, trained):
    model, callback, _ = _train(tiny_configs, train_data, tmp_path, batch=2, accumulation=2, save_strategy="no")
    reference_model, reference, _ = trained
    assert callback.step == STEPS  # not STEPS * 2: one update per optimizer step
    for name, scores in reference.scores().items():
        torch.testing.assert_close(callback.scores()[name], scores, rtol=2e-3, atol=1e-7)
    for name, layer in losparse_layers(reference_model).items():
        assert torch.equal(losparse_layers(model)[name].row_mask, layer.row_mask), name


def test_resume_from_checkpoint_restores_the_pruning_state(tiny_configs, train_data, tmp_path, trained):
    save = dict(save_strategy="steps", save_steps=6)
    _train(tiny_configs, train_data, tmp_path / "first", steps=6, **save)
    checkpoint = tmp_path / "first" / "checkpoint-6"
    state = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["LoSparseCallback"]
    assert state["attributes"]["step"] == 6 and state["attributes"]["encoded_scores"]

    model, callback, _ = _train(tiny_configs, train_data, tmp_path / "first", resume=str(checkpoint), **save)
    reference_model, reference, _ = trained
    assert callback.step == STEPS
    for name, scores in reference.scores().items():
        torch.testing.assert_close(callback.scores()[name], scores, rtol=1e-4, atol=1e-8)
    for name, layer in losparse_layers(reference_model).items():
        assert torch.equal(losparse_layers(model)[name].row_mask, layer.row_mask), name

    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        _train(tiny_configs, train_data, tmp_path / "first", resume=str(checkpoint), restore=False, **save)


def _layer_bytes(directory, names) -> int:
    total = 0
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            if key.rsplit(".", 1)[0] in names:
                tensor = handle.get_slice(key)
                total += torch.Size(tensor.get_shape()).numel() * (1 if "mask" in key else 4)
    return total


def test_export_drops_pruned_rows_and_reloads(trained, tmp_path):
    model, _, _ = trained
    layers = losparse_layers(model)
    names = set(layers)
    kept_rows = {name: m.kept_rows for name, m in layers.items()}
    expected = model(IDS).logits
    export_losparse(model)
    assert not losparse_layers(model)
    config = model.config.quantization_config
    assert config.method == "losparse" and set(config.layer_map) == names
    for name, entry in config.layer_map.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, LinearSparseLowRank)
        assert entry["nnz"] == kept_rows[name] * layer.in_features == layer.sparse_nnz
    torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    dense = sum(m.in_features * m.out_features * 4 for n, m in model.named_modules() if n in names)
    assert _layer_bytes(tmp_path, names) < 0.5 * dense  # 0.3 of S + 0.1 for U V + the 1-bit mask
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.config.quantization_config, OATSConfig)
    assert reloaded.config.quantization_config.method == "losparse"
    torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_callback_refuses_a_model_without_losparse_layers(tiny_llama, train_data, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, report_to=[], use_cpu=True)
    trainer = Trainer(model=tiny_llama, args=args, train_dataset=train_data, callbacks=[LoSparseCallback(_config())])
    with pytest.raises(ValueError, match="apply_losparse"):
        trainer.train()


def test_export_before_pruning_is_refused(tiny_llama):
    apply_losparse(tiny_llama, LoSparseConfig())
    with pytest.raises(ValueError, match="nothing is compressed"):
        export_losparse(tiny_llama)


def test_a_frozen_s_is_refused_by_name(tiny_configs, train_data, tmp_path):
    model = build_tiny_model(tiny_configs["llama"])
    config = _config()
    apply_losparse(model, config)
    name = next(iter(losparse_layers(model)))
    losparse_layers(model)[name].weight.requires_grad_(False)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_data, callbacks=[LoSparseCallback(config)])
    with pytest.raises(ValueError, match=rf"{name}\.weight.*modules_to_not_convert"):
        trainer.train()


def test_a_missing_gradient_is_an_error_naming_the_parameter(tiny_configs):
    model = build_tiny_model(tiny_configs["llama"])
    apply_losparse(model, _config(total_steps=STEPS))
    layers = losparse_layers(model)
    model(IDS, labels=IDS).loss.backward()
    name = list(layers)[1]
    layers[name].weight.grad = None  # what ZeRO / FSDP leave on a sharded parameter
    with pytest.raises(ValueError, match=rf"`{name}\.weight\.grad` is None.*FSDP"):
        LoSparseCallback(_config(total_steps=STEPS)).update(model, 0)
