"""Test matrices shared by the OATS tests."""

import torch


def structured_matrix(
    d_out: int = 48, d_in: int = 64, rank: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank + sparse + noise, with a few outlier input features: the case OATS is built for."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g)
    sparse = torch.randn(d_out, d_in, generator=g) * (torch.rand(d_out, d_in, generator=g) < 0.1) * 3
    weight = low_rank + sparse + 0.05 * torch.randn(d_out, d_in, generator=g)
    norms = torch.rand(d_in, generator=g) + 0.5
    norms[:3] *= 20  # outlier features
    return weight, norms
