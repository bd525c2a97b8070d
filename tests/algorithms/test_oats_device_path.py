"""The fast OATS solver's accelerator path: what runs for a CUDA tensor must stay on the device.

`oats._on_host` is the solver's only device branch (numpy partition and the C++ thresholding kernel are CPU-only).
Forcing it to answer "not on the host" runs the accelerator code path on CPU tensors, with numpy and every
tensor-to-host conversion made to fail, and the result must match the host path's.
"""

import numpy as np
import pytest
import torch

from optimum_oats.algorithms import layer_budget, oats_decompose
from optimum_oats.algorithms import oats as oats_module
from tests.helpers.structured import structured_matrix


def _forbid_host(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the accelerator path called numpy or copied a tensor to the host")

    monkeypatch.setattr(oats_module, "_on_host", lambda tensor: False)
    monkeypatch.setattr(np, "partition", refuse)
    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    monkeypatch.setattr(torch, "from_numpy", refuse)
    monkeypatch.setattr(torch.Tensor, "cpu", refuse)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_accelerator_path_stays_on_device_and_matches_host(monkeypatch, nm):
    weight, norms = structured_matrix(96, 128, 6, seed=3)
    budget = layer_budget(96, 128, 0.5, 0.25, nm)
    kwargs = dict(rank=budget.rank, keep_per_row=budget.keep_per_row, nm=nm, iterations=30, solver="fast")
    host = oats_decompose(weight, norms, **kwargs)
    with monkeypatch.context() as patch:
        _forbid_host(patch)
        with pytest.raises(AssertionError, match="accelerator path"):  # the guard itself works
            np.partition(np.zeros(3), 1)
        device = oats_decompose(weight, norms, **kwargs)
    kept = (device.sparse != 0).sum(dim=1)
    assert (kept == (budget.keep_per_row if nm is None else 128 // 2)).all()
    approx = lambda d: d.sparse + d.lowrank_u @ d.lowrank_v  # noqa: E731
    error = lambda d: float(((weight - approx(d)) * norms).norm() / (weight * norms).norm())  # noqa: E731
    # Same algorithm, other selection routine (topk vs partition + C++ kernel): same result up to float ties.
    assert error(device) == pytest.approx(error(host), rel=1e-3)


def test_host_path_is_taken_on_cpu(monkeypatch):
    # The converse: on the CPU the numpy selection is really used (so the test above exercises a different path).
    calls = []
    original = np.partition
    monkeypatch.setattr(np, "partition", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(oats_module, "_threshold_kernel", lambda residual: None)  # PyTorch thresholding on host
    weight, norms = structured_matrix(96, 128, 6, seed=3)
    budget = layer_budget(96, 128, 0.5, 0.25)
    oats_decompose(weight, norms, rank=budget.rank, keep_per_row=budget.keep_per_row, iterations=10, solver="fast")
    assert calls
