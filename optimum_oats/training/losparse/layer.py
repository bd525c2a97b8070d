"""`LoSparseLinear`: the trainable `U V + S` layer that LoSparse fine-tunes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...nn import LinearSparseLowRank


def losparse_rank(out_features: int, in_features: int, low_rank_ratio: float) -> int:
    """`r = ceil(p · d_out d_in / (d_out + d_in))`: the low-rank term holds a fraction `p` of the layer's weights."""
    rank = math.ceil(low_rank_ratio * out_features * in_features / (out_features + in_features))
    return min(rank, out_features, in_features)


class LoSparseLinear(nn.Module):
    """`y = x (S ⊙ m + U V)^T + b` with trainable `U` `(out, r)`, `V` `(r, in)`, dense `S` and a row mask `m`.

    Built from a linear layer by [`from_linear`]: `U V` is the top-r SVD of W with `√Σ` split into both factors,
    and `S = W - U V`, so the layer starts out computing exactly the original function. `row_mask` holds the last
    row selection of [`LoSparseCallback`]; pruned rows are zeroed in `weight` but, as in the reference, not masked
    in the forward pass: they keep receiving gradients and can regrow until the next selection drops or keeps them.
    [`to_compact`] stores only the rows in `row_mask`.

    Not an `nn.Linear` subclass, for the same reason as [`LinearSparseLowRank`]: tools that treat any
    `nn.Linear` as dense would read S alone as the weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **factory))
        self.lowrank_u = nn.Parameter(torch.zeros(out_features, rank, **factory))
        self.lowrank_v = nn.Parameter(torch.zeros(rank, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.register_buffer("row_mask", torch.ones(out_features, dtype=torch.bool, device=device))

    @property
    def rank(self) -> int:
        return self.lowrank_u.shape[1]

    @property
    def kept_rows(self) -> int:
        return int(self.row_mask.sum())

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> LoSparseLinear:
        """Initialise from `linear`: `U = U_r √Σ_r`, `V = √Σ_r V_r^T`, `S = W - U V` (SVD in float32)."""
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        u, sigma, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = sigma[:rank].sqrt()
        lowrank_u, lowrank_v = u[:, :rank] * root, root[:, None] * vh[:rank]
        layer.lowrank_u.copy_(lowrank_u)
        layer.lowrank_v.copy_(lowrank_v)
        layer.weight.copy_(weight.float() - lowrank_u @ lowrank_v)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def sparse_weight(self) -> torch.Tensor:
        """S with pruned rows zeroed (differentiable)."""
        return self.weight * self.row_mask.unsqueeze(1).to(self.weight.dtype)

    @torch.no_grad()
    def set_row_mask(self, keep: torch.Tensor) -> None:
        """Select the rows where `keep` is True and zero the others (a row zeroed before may be kept again)."""
        self.row_mask.copy_(keep.to(self.row_mask.device))
        self.weight.mul_(self.row_mask.unsqueeze(1).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # not masked: pruned rows are zero and may regrow (see callback)
        if self.rank:
            y = y + F.linear(F.linear(x, self.lowrank_v), self.lowrank_u)
        return y

    @torch.no_grad()
    def to_compact(self) -> LinearSparseLowRank:
        """The deployable layer: only the kept rows' values (plus a bitmask) beside U and V."""
        sparse = self.sparse_weight().detach()
        layer = LinearSparseLowRank(
            self.in_features,
            self.out_features,
            rank=self.rank,
            nnz=int((sparse != 0).sum()),
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        layer.load_decomposition(sparse, self.lowrank_u.detach(), self.lowrank_v.detach())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"kept_rows={self.kept_rows}/{self.out_features}, bias={self.bias is not None}"
        )
