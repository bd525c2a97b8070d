"""`LinearSparseLowRank`: the drop-in replacement for `nn.Linear` holding `W ≈ S + U V`."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.dispatch import dense_sparse, kept_values
from ..kernels.operands import PackedWeights
from ..utils.counting import counted_parameters
from ..utils.quantization import (
    NOT_QUANTIZED,
    SCALE_DTYPE,
    GroupSpec,
    dequantize_codes,
    expand_scales,
    pack_codes,
    packed_bytes,
    quantize_codes,
    unpack_codes,
)

# Importing kernel_execution registers every mode ("auto", "sparse_kernel", "workspace") before the layer exists.
from .execution import EXECUTION_MODES
from .kernel_execution import AUTO_MAX_KERNEL_TOKENS  # noqa: F401
from .packing import pack_bitmask, packed_columns, unpack_bitmask


class LinearSparseLowRank(nn.Module):
    """A linear layer whose weight is a sparse matrix plus a low-rank product: `y = x (S + U V)^T + b`.

    Storage is compact in memory and on disk: the kept entries of S as a 1-D `weight` tensor in
    row-major order plus a packed bitmask `weight_mask` (1 bit per weight), and the factors
    `lowrank_u` `(out_features, rank)` and `lowrank_v` `(rank, in_features)`. A rank of 0 is a plain pruned
    layer (Wanda, magnitude).

    The kept values are deliberately stored under the name `weight`: tools that read `module.weight.dtype` or
    `.device` see the right ones, and a checkpoint loaded by transformers *without* this plugin hits a shape
    mismatch on every `*.weight` (an error) instead of silently initialising dense weights at random.

    It is deliberately not an `nn.Linear` subclass: PEFT and other tools treat any `nn.Linear` as dense and
    would merge adapters into the wrong tensor. `in_features`/`out_features` are exposed for them.

    Quantized (`value_bits` or `lowrank_bits` below 16): the checkpoint holds `b`-bit codes instead of floats, packed
    into a little-endian bit stream (`weight_codes` `(ceil(nnz · b / 8),)` uint8, the kept values in the same
    row-major order), and their fp16 group scales (`weight_scales` `(out_features, ceil(in_features / group_size))`,
    stored as int16 bit patterns so that casting the model to another float dtype never touches them); U and V
    likewise (`lowrank_u_codes`, `lowrank_u_scales`, ...). The kernels read the value codes as stored and decode
    them on the fly, so no float copy of the values exists: `weight` is then an empty buffer that only carries the
    layer's dtype and device (for tools that read `module.weight.dtype`), and [`kept_values`] decodes them on demand.
    `lowrank_u`, `lowrank_v` are non-persistent buffers of the decoded (small) factors ([`decode_`], after each load).

    Args:
        in_features (`int`), out_features (`int`): the shape of the replaced linear layer.
        rank (`int`): columns of U / rows of V.
        nnz (`int`): number of kept entries of S.
        bias (`bool`): whether the layer has a bias.
        value_bits (`int`), lowrank_bits (`int`), group_size (`int`): the storage of the values and of U, V (16: the
            model's float dtype); see `optimum_oats.algorithms.quantize`.
    """

    # The constructor's storage arguments, which a `layer_map` entry of a quantized layer records.
    STORAGE_ARGS = ("value_bits", "lowrank_bits", "group_size")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        nnz: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        value_bits: int = NOT_QUANTIZED,
        lowrank_bits: int = NOT_QUANTIZED,
        group_size: int = 128,
    ) -> None:
        super().__init__()
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"`nnz` must be in [0, {in_features * out_features}], got {nnz}.")
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"`rank` must be in [0, {min(in_features, out_features)}], got {rank}.")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.value_bits = value_bits
        self.lowrank_bits = lowrank_bits if rank else NOT_QUANTIZED
        self.group_size = group_size
        self._nnz = nnz
        self._add_tensor("weight", (nnz,), self.value_spec, factory)
        self.register_buffer(
            "weight_mask", torch.zeros(out_features, packed_columns(in_features), dtype=torch.uint8, device=device)
        )
        self._add_tensor("lowrank_u", (out_features, rank), self.lowrank_spec, factory)
        self._add_tensor("lowrank_v", (rank, in_features), self.lowrank_spec, factory)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        if self.value_spec or self.lowrank_spec:  # codes loaded by `load_state_dict` are decoded at once
            self.register_load_state_dict_post_hook(_decode_after_load)
        self.execution_mode = "auto"  # see nn/kernel_execution.py: kernel for decode, workspace GEMM for prefill
        # Derived from the storage for speed, owned here and dropped by `release_caches`: the dense `S + U V` of the
        # opt-in "merged" mode. The kernels' offset tables live with the mask (optimum_oats/kernels/operands.py).
        self._merged_cache: torch.Tensor | None = None

    def _add_tensor(self, name: str, shape: tuple[int, int], spec: GroupSpec | None, factory: dict) -> None:
        """A float parameter, or (quantized) packed codes + scales and a non-persistent buffer of decoded values."""
        if spec is None:
            setattr(self, name, nn.Parameter(torch.zeros(shape, **factory)))
            return
        count = shape[0] if len(shape) == 1 else shape[0] * shape[1]
        rows, cols = (self.out_features, self.in_features) if len(shape) == 1 else shape
        device = factory["device"]
        placeholder = name == "weight"  # quantized values are decoded where they are read, never kept as floats
        self.register_buffer(name, torch.zeros((0,) if placeholder else shape, **factory), persistent=False)
        codes = torch.zeros(packed_bytes(count, spec.bits), dtype=torch.uint8, device=device)
        self.register_buffer(f"{name}_codes", codes)
        self.register_buffer(
            f"{name}_scales", torch.zeros(rows, spec.num_groups(cols), dtype=torch.int16, device=device)
        )

    @property
    def value_spec(self) -> GroupSpec | None:
        """The grid of the kept values (zero-free), or None when they are stored as floats."""
        return None if self.value_bits >= NOT_QUANTIZED else GroupSpec(self.value_bits, self.group_size)

    @property
    def lowrank_spec(self) -> GroupSpec | None:
        """The grid of U and V (with a zero level), or None when they are stored as floats."""
        if self.lowrank_bits >= NOT_QUANTIZED:
            return None
        return GroupSpec(self.lowrank_bits, self.group_size, zero_level=True)

    @property
    def stored_bits(self) -> int:
        """Bits of everything the checkpoint stores for this layer except the bias: values (codes or floats), mask,
        scales and factors. Over `in_features * out_features` it is the layer's bits per weight."""
        state = self.state_dict()
        return sum(tensor.numel() * tensor.element_size() * 8 for key, tensor in state.items() if key != "bias")

    @torch.no_grad()
    def decode_(self) -> None:
        """Rebuild the float `lowrank_u`, `lowrank_v` from their stored codes and scales (a no-op when stored as
        floats). The one decode formula (`utils.quantization.dequantize_codes`, in float32, then the layer's dtype) is
        the algorithms' own, so a reloaded layer holds bit for bit the factors compression chose. Quantized values
        are not decoded here: every path decodes them where it reads them ([`kept_values`])."""
        spec = self.lowrank_spec
        if spec is not None:
            for name in ("lowrank_u", "lowrank_v"):
                shape = getattr(self, name).shape
                codes = unpack_codes(getattr(self, f"{name}_codes"), spec.bits, shape.numel()).view(shape)
                scales = expand_scales(getattr(self, f"{name}_scales").view(SCALE_DTYPE).float(), shape[1], spec)
                setattr(self, name, dequantize_codes(codes, scales, spec).to(getattr(self, name).dtype))
        self._merged_cache = None

    @property
    def rank(self) -> int:
        return self.lowrank_u.shape[1]

    @property
    def sparse_nnz(self) -> int:
        return self._nnz if self.value_spec is not None else self.weight.numel()

    def kept_values(self) -> torch.Tensor:
        """The kept values of S, 1-D in row-major order, in the layer's dtype: `weight` itself, or decoded from the
        codes of a quantized layer (float32 `(q - z) s`, then the layer's dtype)."""
        if self.value_spec is None:
            return self.weight
        return kept_values(self.packed()).to(self.weight_dtype)

    @property
    def num_parameters(self) -> int:
        """Counted parameters `nnz + rank (d_in + d_out)`: what the compression budget limits (bias excluded)."""
        return counted_parameters(self.sparse_nnz, self.rank, self.in_features, self.out_features)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def dense_mask(self) -> torch.Tensor:
        """The sparsity pattern of S as a bool `(out_features, in_features)` tensor."""
        return unpack_bitmask(self.weight_mask, self.in_features)

    def sparse_weight(self) -> torch.Tensor:
        """S as a dense tensor (differentiable with respect to `weight`)."""
        if self.value_spec is not None:
            return dense_sparse(self.packed()).to(self.weight_dtype)
        dense = self.weight.new_zeros(self.out_features, self.in_features)
        return dense.masked_scatter(self.dense_mask(), self.weight)

    def to_dense(self) -> torch.Tensor:
        """The effective weight `S + U V`, in the layer's dtype (the product is formed in float32)."""
        weight = self.sparse_weight().float()
        if self.rank:
            weight = weight + self.lowrank_u.float() @ self.lowrank_v.float()
        return weight.to(self.weight_dtype)

    def set_execution_mode(self, mode: str) -> None:
        if mode not in EXECUTION_MODES:
            raise ValueError(f"`mode` must be one of {sorted(EXECUTION_MODES)}, got {mode!r}.")
        self.execution_mode = mode
        self._merged_cache = None

    def release_caches(self) -> None:
        """Drop what the layer derived from its storage for speed (the dense `merged` matrix): back to compact size."""
        self._merged_cache = None

    def merged_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """`S + U V` as a dense matrix, cached until `release_caches` (the opt-in "merged" mode: dense memory)."""
        cache = self._merged_cache
        if cache is None or cache.dtype != dtype or cache.device != self.weight.device:
            with torch.no_grad():
                cache = self._merged_cache = self.to_dense().to(dtype=dtype)
        return cache

    def row_offsets(self) -> torch.Tensor:
        """Start of each row's kept values in `weight`, int64 `(out_features + 1,)`; cached until the mask changes.

        With `kernels.operands.chunk_offsets`, the only derived inference data of the kernels (8 bytes per output
        row, 4 per 64 columns), cached with the mask: they read the stored values and packed bitmask as they are.
        """
        return self.packed().value_offsets()

    def packed(self) -> PackedWeights:
        """The storage as the kernels take it, read from the module's dicts: `Module.__getattr__` costs ~1.4 us per
        tensor, a few % of a decode step over 200 layers. Falls back to attributes if a wrapper moved them."""
        params, buffers = self._parameters, self._buffers
        quantized = self.value_bits < NOT_QUANTIZED
        try:
            bias = params["bias"] if "bias" in params else self.bias
            factors = params if "lowrank_u" in params else buffers
            u, v, mask = factors["lowrank_u"], factors["lowrank_v"], buffers["weight_mask"]
            values = buffers["weight_codes"] if quantized else params["weight"]
            scales = buffers["weight_scales"] if quantized else None
        except KeyError:
            bias, u, v, mask = self.bias, self.lowrank_u, self.lowrank_v, self.weight_mask
            values, scales = (self.weight_codes, self.weight_scales) if quantized else (self.weight, None)
        if quantized:
            return PackedWeights(values, mask, u, v, bias, scales, self.value_bits, self.group_size)
        return PackedWeights(values, mask, u, v, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return EXECUTION_MODES[self.execution_mode](self, x)

    @torch.no_grad()
    def load_decomposition(
        self,
        sparse: torch.Tensor,
        lowrank_u: torch.Tensor | None = None,
        lowrank_v: torch.Tensor | None = None,
        scales: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
    ) -> None:
        """Fill the layer from a dense-with-zeros S and factors; the nnz and rank must match the layer's.

        A quantized layer also needs the group `scales` of S, U and V that put them on the grid (as the algorithms
        return them in `Decomposition.value_scales`, `lowrank_u_scales`, `lowrank_v_scales`): the codes are
        recovered from the on-grid values and stored, then decoded back ([`decode_`])."""
        mask = sparse != 0
        if int(mask.sum()) != self.sparse_nnz:
            raise ValueError(f"S has {int(mask.sum())} non-zeros but the layer holds {self.sparse_nnz}.")
        self.weight_mask.copy_(pack_bitmask(mask))
        parts = [("weight", sparse, self.value_spec, scales[0])]
        if self.rank:
            parts += [
                (name, value, self.lowrank_spec, scale)
                for name, value, scale in (
                    ("lowrank_u", lowrank_u, scales[1]),
                    ("lowrank_v", lowrank_v, scales[2]),
                )
            ]
        for name, value, spec, scale in parts:
            if spec is None:
                getattr(self, name).copy_(value[mask] if name == "weight" else value)
                continue
            if scale is None:
                raise ValueError(f"The layer stores `{name}` at {spec.bits} bits: its group scales are needed.")
            scale = scale.float().to(value.device)
            codes = quantize_codes(value.float(), expand_scales(scale, value.shape[1], spec), spec)
            getattr(self, f"{name}_codes").copy_(pack_codes(codes[mask] if name == "weight" else codes, spec.bits))
            getattr(self, f"{name}_scales").copy_(scale.to(SCALE_DTYPE).view(torch.int16))
        self.decode_()

    @classmethod
    def skeleton_of(cls, linear: nn.Linear, rank: int, nnz: int, **storage: int) -> LinearSparseLowRank:
        """An unfilled layer shaped like `linear` (same device, dtype, bias) for a `layer_map` entry's rank and nnz
        (and its `value_bits`, `lowrank_bits`, `group_size` when quantized).

        Loading and resuming build these first, then fill them from a state dict (and [`decode_`] them).
        """
        return cls(
            linear.in_features,
            linear.out_features,
            rank=int(rank),
            nnz=int(nnz),
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **{key: int(value) for key, value in storage.items()},
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        sparse: torch.Tensor,
        lowrank_u: torch.Tensor | None = None,
        lowrank_v: torch.Tensor | None = None,
        *,
        scales: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None),
        **storage: int,
    ) -> LinearSparseLowRank:
        """Build the replacement of `linear` from a decomposition; bias, dtype and device come from `linear`.

        Args:
            linear (`nn.Linear`): the layer being replaced.
            sparse (`torch.Tensor`): S, `(out_features, in_features)`, zeros where pruned.
            lowrank_u (`torch.Tensor`, *optional*): `(out_features, rank)`.
            lowrank_v (`torch.Tensor`, *optional*): `(rank, in_features)`.
            scales (`tuple`, *optional*): the group scales of S, U, V when quantized (see [`load_decomposition`]).
            storage: `value_bits`, `lowrank_bits`, `group_size` of a quantized layer.
        """
        if sparse.shape != linear.weight.shape:
            raise ValueError(f"S has shape {tuple(sparse.shape)}, expected {tuple(linear.weight.shape)}.")
        dtype, device = linear.weight.dtype, linear.weight.device
        # quantized values keep float32 until encoded: a cast to bf16 first would move them off the grid
        sparse = sparse.to(device=device, dtype=dtype if storage.get("value_bits", NOT_QUANTIZED) >= 16 else None)
        rank = 0 if lowrank_u is None else lowrank_u.shape[1]
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank=rank,
            nnz=int((sparse != 0).sum()),
            bias=linear.bias is not None,
            device=device,
            dtype=dtype,
            **storage,
        )
        if rank:
            lowrank_u, lowrank_v = lowrank_u.to(device=device), lowrank_v.to(device=device)
            if layer.lowrank_spec is None:
                lowrank_u, lowrank_v = lowrank_u.to(dtype), lowrank_v.to(dtype)
        layer.load_decomposition(sparse, lowrank_u, lowrank_v, scales)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self, include_low_rank: bool = True) -> nn.Linear:
        """The dense equivalent (`S + U V`, e.g. for `dequantize()`), or S alone with `include_low_rank=False`."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight_dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.to_dense() if include_low_rank else self.sparse_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        density = self.sparse_nnz / max(1, self.in_features * self.out_features)
        kept = self.num_parameters / max(1, self.in_features * self.out_features)
        quantized = ""
        if self.value_spec or self.lowrank_spec:
            quantized = f", value_bits={self.value_bits}, lowrank_bits={self.lowrank_bits}, group={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"sparse_density={density:.3f}, kept={kept:.3f}{quantized}, bias={self.bias is not None}, "
            f"mode={self.execution_mode}"
        )


def set_execution_mode(model: nn.Module, mode: str) -> int:
    """Set `mode` on every `LinearSparseLowRank` in `model`; returns how many layers were set.

    Example:
        >>> from optimum_oats.nn import set_execution_mode
        >>> set_execution_mode(model, "sparse_kernel")  # or "auto", "merged", "decompress"
    """
    count = 0
    for module in model.modules():
        if isinstance(module, LinearSparseLowRank):
            module.set_execution_mode(mode)
            count += 1
    return count


def _decode_after_load(module: LinearSparseLowRank, incompatible_keys) -> None:
    module.decode_()


def decode_quantized_layers(model: nn.Module) -> int:
    """[`LinearSparseLowRank.decode_`] every quantized layer (after its codes were loaded); returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, LinearSparseLowRank) and (module.value_spec or module.lowrank_spec):
            module.decode_()
            count += 1
    return count
