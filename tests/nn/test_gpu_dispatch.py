"""How the execution modes route a call to the Triton GPU path (`optimum_oats.kernels.gpu`), on the CPU.

A CUDA call cannot be made here, so the routing rules are checked as the pure functions they are
([`gpu_eligible`], [`choose_gpu_path`]), the wiring by standing in for the path choice, and the CPU build by a
fresh process that must never load the GPU module.
"""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from optimum_oats.kernels import dispatch, gpu
from optimum_oats.kernels.dispatch import gpu_eligible
from optimum_oats.kernels.operands import PackedWeights
from optimum_oats.kernels.workspaces import workspace, workspaces
from optimum_oats.nn import LinearSparseLowRank
from optimum_oats.nn.kernel_execution import release_workspaces

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("device_type", "x_dtype", "weight_dtype", "needs_grad", "triton_ready", "expected"),
    [
        ("cuda", BF16, BF16, False, True, True),
        ("cuda", FP16, FP16, False, True, True),
        ("cuda", FP32, FP32, False, True, True),
        ("cpu", FP32, FP32, False, True, False),  # the CPU has its own C++ kernel
        ("cuda", BF16, BF16, True, True, False),  # training: the differentiable "decompress"
        ("cuda", BF16, BF16, False, False, False),  # Triton missing or broken
        ("cuda", FP32, BF16, False, True, False),  # input not in the layer's dtype
        ("cuda", torch.float64, torch.float64, False, True, False),  # no Triton kernel for float64
        ("mps", FP16, FP16, False, True, False),
    ],
)
def test_gpu_eligible(device_type, x_dtype, weight_dtype, needs_grad, triton_ready, expected):
    assert gpu_eligible(device_type, x_dtype, weight_dtype, needs_grad, triton_ready) is expected


def _layer():
    linear = torch.nn.Linear(16, 8)
    sparse = linear.weight.detach() * (torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) < 0.5)
    return LinearSparseLowRank.from_linear(linear, sparse, torch.randn(8, 2), torch.randn(2, 16))


@pytest.mark.parametrize("mode", ["auto", "sparse_kernel", "workspace"])
def test_eligible_calls_reach_the_gpu_paths_with_the_layers_storage(monkeypatch, mode):
    calls = []

    def fake_run(path, w, x):
        calls.append((path, w))
        return torch.zeros(3, 8)

    monkeypatch.setattr(
        dispatch, "plan", lambda w, x, chosen: ({"workspace": "triton_workspace"}.get(chosen, "triton_decode"), None)
    )
    monkeypatch.setattr(gpu, "run", fake_run)
    layer = _layer().requires_grad_(False)
    layer.set_execution_mode(mode)
    with torch.no_grad():
        assert torch.equal(layer(torch.randn(3, 16)), torch.zeros(3, 8))
    ((path, w),) = calls
    assert path == ("triton_workspace" if mode == "workspace" else "triton_decode")
    assert isinstance(w, PackedWeights) and w.values is layer.weight and w.mask is layer.weight_mask


def test_a_training_call_on_cuda_warns_once_that_it_builds_a_dense_s(monkeypatch):
    dispatch._GRAD_WARNED.clear()
    layer = _layer()
    cuda_like = types.SimpleNamespace(is_cuda=True, requires_grad=False)  # what the rule reads of a CUDA input
    with pytest.warns(RuntimeWarning, match="no_grad"):
        dispatch.warn_dense_training_once(layer.packed(), cuda_like)
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        dispatch.warn_dense_training_once(layer.packed(), cuda_like)  # once only
    dispatch._GRAD_WARNED.clear()
    # The modes ask for it whenever autograd forces the dense path (on the CPU the rule itself stays silent).
    asked = []
    monkeypatch.setattr(dispatch, "warn_dense_training_once", lambda w, x: asked.append(w))
    layer(torch.randn(2, 16))
    assert len(asked) == 1


@pytest.mark.slow
def test_cpu_calls_never_load_the_gpu_module():
    code = textwrap.dedent(
        """
        import sys
        import torch
        from optimum_oats.nn import LinearSparseLowRank
        layer = LinearSparseLowRank.from_linear(torch.nn.Linear(8, 4), torch.eye(4, 8), None, None)
        with torch.no_grad():
            for tokens in (1, 64):
                layer(torch.ones(tokens, 8))
        # (torch itself may import triton when it is installed; our GPU modules must stay unloaded)
        assert not [name for name in sys.modules if name.startswith("optimum_oats.kernels.") and "gpu" in name]
        assert "optimum_oats.kernels.triton_sparse_lowrank" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "OATS_DISABLE_KERNELS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_one_workspace_cache_serves_every_path():
    workspace(4, 8, torch.float32, torch.device("cpu"))
    assert workspaces()
    release_workspaces()
    assert not workspaces()
