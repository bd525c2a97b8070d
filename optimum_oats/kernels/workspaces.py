"""The dense buffers that prefill decompresses S into: one per layer shape, dtype, device and thread, shared by every
layer of that shape (the CPU and CUDA paths alike), so a long prompt never leaves a dense copy per layer behind."""

from __future__ import annotations

import threading

import torch

_WORKSPACES = threading.local()  # per thread: {(device, dtype, out_features, in_features): buffer}


def workspaces() -> dict[tuple[torch.device, torch.dtype, int, int], torch.Tensor]:
    """This thread's workspaces, by (device, dtype, out_features, in_features)."""
    return _WORKSPACES.__dict__.setdefault("buffers", {})


def workspace(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The dense `(out_features, in_features)` buffer of this shape, dtype and device (allocated on first use).

    A model holds one transient dense matrix per distinct layer shape (four for a Llama block) instead of one per
    layer. Safe while the calls of a thread are ordered (one CUDA stream). Free them with [`release_workspaces`].
    """
    buffers = workspaces()
    key = (torch.device(device), dtype, out_features, in_features)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = torch.empty(out_features, in_features, dtype=dtype, device=device)
    return buffer


def release_workspaces() -> None:
    """Free this thread's workspaces (rebuilt on the next long prompt)."""
    _WORKSPACES.__dict__.pop("buffers", None)


__all__ = ["release_workspaces", "workspace", "workspaces"]
