"""Distributed compression over `torch.distributed` (launched with `torchrun`; gloo on CPU, NCCL on GPU).

Once a block's calibration statistics are known, its linear layers are independent problems. Every rank runs the
same (cheap) block forward passes, so every rank holds identical statistics and identical block inputs, and no
reduction whose summation order could change a bit is needed; the (expensive) decompositions are split across
ranks, and each finished layer is broadcast from the rank that computed it. Every rank ends with the full
compressed model, bit-identical to a single-process run with the same thread settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..nn import LinearSparseLowRank


def world() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group, `(0, 1)` when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(value: int) -> int:
    """`value` when every rank holds the same one, else 0 (single process: `value`).

    Used for the number of blocks to restore from a resume folder: ranks that see different folders (not shared)
    or different progress all start from the beginning rather than diverge.
    """
    import torch.distributed as dist

    _, world_size = world()
    if world_size == 1:
        return value
    values: list[int] = [0] * world_size
    dist.all_gather_object(values, value)
    return value if len(set(values)) == 1 else 0


def _cost(shape: tuple[int, int]) -> int:
    """Relative cost of decomposing a `(d_out, d_in)` matrix: a thin SVD is `O(d_out d_in min(d_out, d_in))`."""
    d_out, d_in = shape
    return d_out * d_in * min(d_out, d_in)


def assign_layers(shapes: dict[str, tuple[int, int]], world_size: int) -> dict[str, int]:
    """Deterministic load balancing: largest layer first onto the least-loaded rank (ties: lowest rank, name order).

    Every rank computes the same assignment from the same shapes, so no communication is needed to agree on it.
    """
    loads = [0] * world_size
    owners: dict[str, int] = {}
    order = sorted(shapes, key=lambda name: (-_cost(shapes[name]), list(shapes).index(name)))
    for name in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[name] = rank
        loads[rank] += _cost(shapes[name])
    return owners


@torch.no_grad()
def share_layers(
    linears: dict[str, nn.Linear],
    owners: dict[str, int],
    results: dict[str, tuple[LinearSparseLowRank, dict[str, Any]]],
) -> dict[str, tuple[LinearSparseLowRank, dict[str, Any]]]:
    """Give every rank every compressed layer of the block: each is broadcast from the rank that computed it.

    Args:
        linears: the block's dense layers, in the block's order (the same on every rank).
        owners: which rank computed which layer ([`assign_layers`]).
        results: this rank's `{name: (layer, layer_map entry)}`.

    Returns:
        `{name: (layer, entry)}` for every layer of `linears`, in their order.
    """
    import torch.distributed as dist

    rank, world_size = world()
    shapes = {name: (layer.rank, layer.sparse_nnz, entry) for name, (layer, entry) in results.items()}
    gathered: list[dict[str, Any]] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, shapes)
    shared = {}
    for name, linear in linears.items():
        owner = owners[name]
        layer_rank, nnz, entry = gathered[owner][name]
        if owner == rank:
            layer = results[name][0]
        else:
            storage = {key: entry[key] for key in LinearSparseLowRank.STORAGE_ARGS if key in entry}
            layer = LinearSparseLowRank.skeleton_of(linear, layer_rank, nnz, **storage)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        for key, tensor in layer.state_dict().items():  # what a checkpoint holds: values or codes + scales, mask, U V
            if key != "bias" and tensor.numel():
                dist.broadcast(tensor.data, src=owner)
        layer.decode_()
        shared[name] = (layer, entry)
    return shared
