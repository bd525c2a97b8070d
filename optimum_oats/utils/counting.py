"""How compressed parameters are counted: the one formula every budget, layer, report and card uses."""


def counted_parameters(nnz: int, rank: int, in_features: int, out_features: int) -> int:
    """`nnz + rank (d_in + d_out)`: the kept values of S plus the entries of U and V (bias and mask excluded).

    This is what `compression_rate` limits: a layer compressed at ρ counts at most `(1 - ρ) d_in d_out`.
    """
    return nnz + rank * (in_features + out_features)
