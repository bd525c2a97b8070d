"""Compressed layers and their compiled kernels (one also serves the fast OATS solver); no algorithm math here."""

from .execution import EXECUTION_MODES, register_execution_mode
from .kernel_execution import choose_mode
from .packing import pack_bitmask, unpack_bitmask
from .quantized_embedding import QuantizedEmbedding, TiedQuantizedHead
from .sparse_lowrank import LinearSparseLowRank, decode_quantized_layers, set_execution_mode

__all__ = [
    "EXECUTION_MODES",
    "LinearSparseLowRank",
    "QuantizedEmbedding",
    "TiedQuantizedHead",
    "choose_mode",
    "decode_quantized_layers",
    "pack_bitmask",
    "register_execution_mode",
    "set_execution_mode",
    "unpack_bitmask",
]
