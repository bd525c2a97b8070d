"""How compressed parameters are counted: the one formula every budget, layer, report and card uses."""


def counted_parameters(nnz: int, rank: int, in_features: int, out_features: int) -> int:
    """`nnz + rank (d_in + d_out)`: the kept values of S plus the entries of U and V (bias and mask excluded).

    This is what `compression_rate` limits: a layer compressed at ρ counts at most `(1 - ρ) d_in d_out`.
    """
    return nnz + rank * (in_features + out_features)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def storage_bits(
    nnz: int,
    rank: int,
    in_features: int,
    out_features: int,
    *,
    value_bits: int,
    lowrank_bits: int,
    group_size: int,
    float_bits: int = 16,
) -> int:
    """Bits a compressed layer stores: values, bitmask, scales and factors (bias excluded), as the checkpoint holds
    them: `b`-bit codes packed into whole bytes, one fp16 scale per group of `group_size` columns per row, 1 bit of
    mask per weight; parts at 16 bits are stored as `float_bits` floats (the model's dtype).

    Over `in_features * out_features` this is the layer's bits per weight."""
    bits = out_features * ceil_div(in_features, 8) * 8  # the packed mask, whole bytes per row
    if value_bits >= 16:
        bits += nnz * float_bits
    else:
        bits += ceil_div(nnz * value_bits, 8) * 8 + out_features * ceil_div(in_features, group_size) * 16
    if rank:
        if lowrank_bits >= 16:
            bits += rank * (in_features + out_features) * float_bits
        else:
            for rows, cols in ((out_features, rank), (rank, in_features)):
                bits += ceil_div(rows * cols * lowrank_bits, 8) * 8 + rows * ceil_div(cols, group_size) * 16
    return bits
