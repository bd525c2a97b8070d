"""`QuantizedEmbedding` and `TiedQuantizedHead`: the token embedding stored as int8 rows, one fp16 scale per row,
read by the embedding lookup and, when the model ties them, by the LM head.

Why: in a small model the tied embedding is a large share of the bytes (SmolLM2-135M: 28.3M of 134.5M weights, 57 MB
in bf16, as much as all 30 blocks once they are compressed to about 4 bits), and the LM head is one GEMV over all of
it per generated token. Int8 rows halve both and cost nothing measurable (WikiText-2 22.879 → 22.890 on the dense
model, `benchmarks/embedding_bits.py`); 6-bit rows cost +1.3% and 4-bit +14-20%, so 8 is the only width offered.

Storage: `weight_codes` `(num_embeddings, embedding_dim)` int8 (code `q` stands for `q · s`, the grid with a zero
level of `optimum_oats.algorithms.quantize`) and `weight_scales` `(num_embeddings,)` fp16 stored as int16 bit patterns,
so that casting the model to another float dtype never touches them. `weight` is an empty non-persistent buffer that
only carries the model's dtype and device, as in `LinearSparseLowRank`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..utils.quantization import SCALE_DTYPE

# Up to this many rows (tokens) the LM head runs torch's int8 weight-only GEMM (`_weight_int8pack_mm`, CPU): 1.7x the
# bf16 GEMV at one thread. Above, decoding the table once and one float GEMM is faster (the int8 GEMM is 4.5x slower
# than bf16 at 512 rows), which is what prefill and perplexity evaluation hit.
INT8_GEMM_MAX_ROWS = 16
_INT8_GEMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class QuantizedEmbedding(nn.Module):
    """A drop-in `nn.Embedding` whose table is int8 codes with one scale per row (see the module docstring)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        codes = torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scales", torch.zeros(num_embeddings, dtype=torch.int16, device=device))
        self.register_buffer("weight", torch.zeros(0, device=device, dtype=dtype), persistent=False)

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, padding_idx: int | None = None
    ) -> QuantizedEmbedding:
        """A layer holding `codes` (int8 `(rows, dim)`) and `scales` (`(rows,)`, any float dtype; stored as fp16)."""
        rows, dim = codes.shape
        layer = cls(rows, dim, padding_idx, device=codes.device, dtype=dtype)
        layer.weight_codes = codes.to(torch.int8).contiguous()
        layer.weight_scales = scales.to(SCALE_DTYPE).view(torch.int16).contiguous()
        return layer

    @classmethod
    def skeleton_of(cls, embedding: nn.Embedding) -> QuantizedEmbedding:
        """An empty layer of `embedding`'s shape, device and dtype (the meta device under `from_pretrained`)."""
        weight = embedding.weight
        return cls(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, weight.device, weight.dtype
        )

    @property
    def scales(self) -> torch.Tensor:
        """The per-row scales as float32."""
        return self.weight_scales.view(SCALE_DTYPE).float()

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float table `(num_embeddings, embedding_dim)`: codes times scales in float32, then `dtype`."""
        return (self.weight_codes.float() * self.scales.unsqueeze(1)).to(dtype or self.weight.dtype)

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_codes, self.weight_scales))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Gather first, then convert: only the looked-up rows' scales, not the whole vocabulary's, per call.
        scales = self.weight_scales[input_ids].view(SCALE_DTYPE).float()
        rows = self.weight_codes[input_ids].float() * scales.unsqueeze(-1)
        return rows.to(self.weight.dtype)

    def to_embedding(self) -> nn.Embedding:
        """A plain `nn.Embedding` holding the decoded table (for `dequantize()`)."""
        weight = self.dequantized()
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device=weight.device)
        embedding.weight = nn.Parameter(weight)
        return embedding

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8"


class TiedQuantizedHead(nn.Module):
    """The LM head of a model whose output embedding is tied to a [`QuantizedEmbedding`]: `logits = x Eᵀ`.

    It owns no tensor (the tie): the embedding is held by reference, not registered as a submodule, so the codes are
    stored once in memory and in the checkpoint, and `model.to(...)` moves them through the embedding."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not `self.embedding = `: that would register it

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The dtype/device carrier of the tied embedding (what tools read from `lm_head.weight`)."""
        return self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.embedding
        rows = x.reshape(-1, x.shape[-1])
        if x.device.type == "cpu" and rows.shape[0] <= INT8_GEMM_MAX_ROWS and x.dtype in _INT8_GEMM_DTYPES:
            scales = table.scales.to(x.dtype)
            out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), table.weight_codes, scales)
        else:
            out = F.linear(rows, table.dequantized(x.dtype))
        return out.reshape(*x.shape[:-1], table.num_embeddings)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the int8 embedding"
