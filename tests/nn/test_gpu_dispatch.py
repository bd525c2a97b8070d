"""How "auto" and "sparse_kernel" route a call to the Triton GPU path (`optimum_oats.kernels.gpu`), on the CPU.

A CUDA call cannot be made here, so the routing rule is checked as the pure function it is ([`gpu_eligible`]),
the wiring by standing in for the GPU module, and the CPU build by a fresh process that must never load it.
"""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from optimum_oats.kernels import gpu
from optimum_oats.nn import LinearSparseLowRank, choose_mode, kernel_execution
from optimum_oats.nn.kernel_execution import gpu_eligible, release_workspaces

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


@pytest.mark.parametrize("mode", ["auto", "sparse_kernel"])
def test_eligible_calls_go_to_layer_forward_with_the_cached_offsets(monkeypatch, mode):
    calls = []
    fake = types.SimpleNamespace(layer_forward=lambda layer, x, offsets: calls.append(offsets) or torch.zeros(3, 8))
    monkeypatch.setattr(kernel_execution, "_gpu_path", lambda layer, x: fake)
    layer = _layer().requires_grad_(False)
    layer.set_execution_mode(mode)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.zeros(3, 8))
        assert choose_mode(layer, x) == "sparse_kernel"
    assert len(calls) == 1 and calls[0] is layer.row_offsets()


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


def test_release_workspaces_frees_the_gpu_ones():
    gpu.workspace(4, 8, torch.float32, torch.device("cpu"))
    assert gpu._workspaces
    release_workspaces()
    assert not gpu._workspaces
