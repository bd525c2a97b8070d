import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_oats import LinearSparseLowRank, OATSConfig, compress
from optimum_oats.integrations.peft import from_peft_model, to_peft_model
from optimum_oats.training.recovery import TimeBudgetCallback, mask_fingerprint, prepare_for_recovery, token_windows
from tests.helpers.tiny_models import build_tiny_model

IDS = torch.tensor([[1, 5, 99, 300, 7, 42, 1000, 3]])


@pytest.fixture
def oats_model(tiny_configs, tokenizer, calibration_texts):
    model = build_tiny_model(tiny_configs["llama"])
    config = OATSConfig(dataset=calibration_texts[:200], num_samples=2, seqlen=32, num_iterations=4)
    return compress(model, config, tokenizer, progress=False)


@pytest.fixture(scope="module")
def texts(data_dir):
    valid = (data_dir / "wikitext2" / "wiki.valid.raw").read_text()[:20000]
    test = (data_dir / "wikitext2" / "wiki.test.raw").read_text()[:8000]
    return valid, test


def _held_out_loss(model, examples) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(model(**{k: v[None] for k, v in e.items()}).loss) for e in examples) / len(examples)


def _args(tmp_path, **kwargs):
    base = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=12,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        lr_scheduler_type="constant",
    )
    base.update(kwargs)
    return TrainingArguments(**base)


@pytest.mark.parametrize("train_sparse", [False, True])
def test_trainer_recovery_keeps_mask_lowers_loss_and_saves_compact(
    oats_model, tokenizer, texts, tmp_path, train_sparse
):
    train, held_out = token_windows(tokenizer, texts[0], 64), token_windows(tokenizer, texts[1], 64)
    masks = mask_fingerprint(oats_model)
    frozen = oats_model.get_input_embeddings().weight.clone()
    values = oats_model.get_submodule("model.layers.0.mlp.up_proj").weight.clone()
    trainable = prepare_for_recovery(oats_model, train_sparse=train_sparse)
    layers = [m for m in oats_model.modules() if isinstance(m, LinearSparseLowRank)]
    assert trainable == sum(m.rank * (m.in_features + m.out_features) + train_sparse * m.sparse_nnz for m in layers)

    before = _held_out_loss(oats_model, held_out)
    Trainer(model=oats_model, args=_args(tmp_path, max_steps=24), train_dataset=train).train()
    after = _held_out_loss(oats_model, held_out)

    assert after < before - 0.03
    for name, mask in mask_fingerprint(oats_model).items():
        assert torch.equal(mask, masks[name]), name
    assert torch.equal(oats_model.get_input_embeddings().weight, frozen)
    changed = not torch.equal(oats_model.get_submodule("model.layers.0.mlp.up_proj").weight, values)
    assert changed == train_sparse

    expected = oats_model(IDS).logits
    oats_model.save_pretrained(tmp_path / "recovered")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered")
    torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_route_keeps_mask_and_folds_back(oats_model, tokenizer, texts, tmp_path):
    train, held_out = token_windows(tokenizer, texts[0], 64), token_windows(tokenizer, texts[1], 64)
    masks = mask_fingerprint(oats_model)
    peft_model = to_peft_model(oats_model)
    before = _held_out_loss(peft_model, held_out)
    Trainer(model=peft_model, args=_args(tmp_path), train_dataset=train).train()
    assert _held_out_loss(peft_model, held_out) < before - 0.03

    model = from_peft_model(peft_model)
    for name, mask in mask_fingerprint(model).items():
        assert torch.equal(mask, masks[name]), name
    expected = model(IDS).logits
    model.save_pretrained(tmp_path / "recovered")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "recovered")
    torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_time_budget_stops_training(oats_model, tokenizer, texts, tmp_path):
    prepare_for_recovery(oats_model)
    train = token_windows(tokenizer, texts[0], 64)
    trainer = Trainer(
        model=oats_model,
        args=_args(tmp_path, max_steps=1000),
        train_dataset=train,
        callbacks=[TimeBudgetCallback(0.0)],
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_errors(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="compress it first"):
        prepare_for_recovery(tiny_llama)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tokenizer, "short", 64)


def test_balanced_factors_keep_the_product(oats_model):
    from optimum_oats.training.recovery import balance_factors

    layer = oats_model.get_submodule("model.layers.0.mlp.down_proj")
    before = layer.to_dense()
    balance_factors(layer)
    torch.testing.assert_close(layer.to_dense(), before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lowrank_u.norm(dim=0), layer.lowrank_v.norm(dim=1), rtol=1e-4, atol=1e-6)
