"""The packed bitmask helpers, kept importable from `optimum_oats.nn` (they live beside the kernels that read them)."""

from ..kernels.packing import group_counts, pack_bitmask, packed_columns, padding_bits, row_counts, unpack_bitmask

__all__ = ["group_counts", "pack_bitmask", "packed_columns", "padding_bits", "row_counts", "unpack_bitmask"]
