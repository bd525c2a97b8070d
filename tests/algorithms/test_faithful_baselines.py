"""The baselines as their reference code runs them: magnitude with one threshold per layer, SparseGPT with the joint
mask inside each column block; and every path of the compact layer copes with the uneven rows they produce."""

from __future__ import annotations

import torch

from optimum_oats import OATSConfig, compress
from optimum_oats.algorithms import ALGORITHMS, HESSIAN, INPUT_NORMS, layer_budget, magnitude_prune
from optimum_oats.nn import LinearSparseLowRank
from tests.helpers.tiny_models import build_tiny_model


def _reference_prune_magnitude(W: torch.Tensor, sparsity_ratio: float) -> torch.Tensor:
    """locuslab/wanda `lib/prune.py::prune_magnitude` (unstructured branch), line by line for one layer.

    https://github.com/locuslab/wanda/blob/main/lib/prune.py
    """
    W = W.clone()
    W_metric = torch.abs(W)
    thresh = torch.sort(W_metric.flatten())[0][int(W.numel() * sparsity_ratio)]
    W_mask = W_metric <= thresh
    W[W_mask] = 0
    return W


def test_magnitude_matches_the_reference_per_layer_threshold():
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.3, 0.5, 0.7):
        assert torch.equal(magnitude_prune(W, sparsity=sparsity), _reference_prune_magnitude(W, sparsity))
    kept_per_row = (magnitude_prune(W, sparsity=0.5) != 0).sum(1)
    assert len(set(kept_per_row.tolist())) > 1  # one threshold for the layer: rows keep different counts


def test_registry_runs_the_joint_rules_within_the_budget():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(32, 128, generator=g)
    X = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g)  # correlated inputs
    stats = {HESSIAN: 2 * X.T @ X / X.shape[0], INPUT_NORMS: X.norm(dim=0)}
    budget = layer_budget(32, 128, 0.5, 0.0)
    config = OATSConfig()
    for method in ("sparsegpt", "magnitude"):
        sparse = ALGORITHMS[method].run(W, stats, budget, config).sparse
        rows = (sparse != 0).sum(1)
        assert len(set(rows.tolist())) > 1, method
        assert int(rows.sum()) <= budget.keep_per_row * 32, method  # never over the budget
        assert int(rows.sum()) >= budget.keep_per_row * 32 - 4, method  # one extra prune per 128-column block


def test_uneven_rows_go_through_the_kernel_save_and_reload(tiny_configs, tokenizer, calibration_texts, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(tiny_configs["llama"])
    config = OATSConfig(method="sparsegpt", dataset=calibration_texts[:200], num_samples=2, seqlen=32)
    compress(model, config, tokenizer, progress=False)
    layers = [m for m in model.modules() if isinstance(m, LinearSparseLowRank)]
    assert any(len(set(m.row_offsets().diff().tolist())) > 1 for m in layers)  # uneven rows really happen
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        reference = model(ids).logits
        for layer in layers:
            layer.set_execution_mode("decompress")
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference, rtol=1e-5, atol=1e-5)
