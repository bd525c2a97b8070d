"""Compressed layers and their execution kernels; no algorithm code lives here."""

from .execution import EXECUTION_MODES, register_execution_mode
from .kernel_execution import choose_mode, set_execution_mode
from .packing import pack_bitmask, unpack_bitmask
from .sparse_lowrank import LinearSparseLowRank

__all__ = [
    "EXECUTION_MODES",
    "LinearSparseLowRank",
    "choose_mode",
    "pack_bitmask",
    "register_execution_mode",
    "set_execution_mode",
    "unpack_bitmask",
]
