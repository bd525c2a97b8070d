"""The patches of transformers: one list, each pinned to the signatures it was written for, each undoable and
each turned off by `OATS_NO_PATCH`."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import transformers.utils.hub

from optimum_oats.integrations.patches import (
    OPT_OUT_ENV,
    PATCHES,
    applied_patches,
    apply_patches,
    opted_out,
    undo_patches,
)
from optimum_oats.integrations.patching import original_of, resolve, signature_text

PINS = sorted((name, path) for name, patch in PATCHES.items() for path in patch.signatures)


def test_importing_the_package_applies_every_patch():
    assert applied_patches() == set(PATCHES)


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_every_replaced_attribute_is_pinned(name):
    patch = PATCHES[name]
    assert {f"{owner}.{patch.attribute}" for owner in patch.owners} <= set(patch.signatures)
    assert patch.effect


@pytest.mark.parametrize(("name", "path"), PINS, ids=[f"{n}:{p.rpartition('.')[2]}" for n, p in PINS])
def test_transformers_signatures_are_the_ones_the_patches_were_written_for(name, path):
    """Fails on a transformers upgrade that changes a patched signature: review the wrapper in
    `optimum_oats/integrations/` (does it still pass every argument through, read the ones it reads?), then update
    the pinned text."""
    assert signature_text(original_of(path)) == PATCHES[name].signatures[path]


def test_the_pin_notices_a_changed_signature(monkeypatch):
    """The check above can fail: a transformers function with one more parameter no longer matches."""
    path = "transformers.utils.hub.create_and_tag_model_card"

    def create_and_tag_model_card(repo_id, tags=None, token=None, ignore_metadata_errors=False):
        raise AssertionError("never called")

    monkeypatch.setattr(transformers.utils.hub, "create_and_tag_model_card", create_and_tag_model_card)
    assert signature_text(original_of(path)) != PATCHES["create_and_tag_model_card"].signatures[path]


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_undo_restores_transformers_own_attribute_and_apply_puts_ours_back(name):
    patch = PATCHES[name]
    targets = [f"{owner}.{patch.attribute}" for owner in patch.owners]
    originals = [original_of(path) for path in targets]
    try:
        undo_patches(name)
        assert name not in applied_patches() and applied_patches() == set(PATCHES) - {name}
        for path, original in zip(targets, originals, strict=True):
            restored = resolve(path)
            assert getattr(restored, "__func__", restored) is original, path
        undo_patches(name)  # twice: nothing more to undo
    finally:
        apply_patches(name)
    assert applied_patches() == set(PATCHES)
    ours = [resolve(path) for path in targets]
    apply_patches(name)  # twice (as a re-import): the same wrappers, not a wrapper of a wrapper
    assert all(resolve(path) is wrapper for path, wrapper in zip(targets, ours, strict=True))
    assert [original_of(path) for path in targets] == originals


def test_unknown_names_are_refused_or_warned_about(monkeypatch):
    with pytest.raises(ValueError, match="Unknown patch name.*'push_to_hbu'.*the patches are"):
        undo_patches("push_to_hbu")
    monkeypatch.setenv(OPT_OUT_ENV, "push_to_hbu, save_pretrained")
    with pytest.warns(UserWarning, match=f"`{OPT_OUT_ENV}=push_to_hbu, save_pretrained` names \\['push_to_hbu'\\]"):
        assert opted_out() == {"save_pretrained"}
    monkeypatch.setenv(OPT_OUT_ENV, "all")
    assert opted_out() == set(PATCHES)


@pytest.mark.slow
def test_opting_out_in_the_environment_leaves_transformers_untouched():
    """In a fresh process: the named patches are never applied; transformers' methods are its own."""
    code = textwrap.dedent(
        """
        import inspect, optimum_oats
        from transformers import PreTrainedModel
        from optimum_oats.integrations.patches import applied_patches
        print(sorted(applied_patches()))
        print(inspect.getsourcefile(PreTrainedModel.push_to_hub))
        """
    )
    env = {**os.environ, OPT_OUT_ENV: "push_to_hub,create_and_tag_model_card"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    applied, source = out.splitlines()
    assert applied == "['from_pretrained', 'save_pretrained']"
    assert source == inspect.getsourcefile(original_of("transformers.PreTrainedModel.push_to_hub"))
    assert source.endswith("transformers/modeling_utils.py")


def test_without_the_save_pretrained_patch_a_compressed_model_saves_with_transformers_writer(
    tiny_llama, tokenizer, calibration_texts, tmp_path
):
    """The opt-out loses the extras (report, remote code, card, staged write), never the checkpoint itself."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_oats import OATSConfig, compress

    config = OATSConfig(dataset=calibration_texts[:100], num_samples=2, seqlen=32, num_iterations=2)
    model = compress(tiny_llama, config, tokenizer, progress=False)
    try:
        undo_patches("save_pretrained")
        model.save_pretrained(tmp_path)
    finally:
        apply_patches("save_pretrained")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    ids = torch.tensor([[1, 5, 99, 300]])
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
