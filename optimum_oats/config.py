"""`OATSConfig`: what to compress, how hard, and with which calibration data."""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .algorithms import (
    DEFAULT_GROUP_SIZE,
    LOWRANK_BITS,
    NOT_QUANTIZED,
    VALUE_BITS,
    method_info,
    method_names,
    resolve_method_settings,
)
from .data.kinds import is_in_memory_dataset
from .data.text import SAMPLINGS
from .legacy_settings import (
    FLAT_METHOD_SETTINGS,
    FlatSettings,
    accept_flat_settings,
    fold_flat_settings,
    renamed,
    warn_flat,
)
from .utils.quantization import EMBEDDING_BITS
from .utils.settings import check_float as _check_float
from .utils.settings import check_int as _check_int
from .utils.settings import setting

QUANT_METHOD = "oats"
# Fields only Python can set: no `oats compress` flag (`method_settings` is spread into its fields' flags).
PYTHON_ONLY_FIELDS = ("quant_method", "method_settings", "tokenizer", "image_processor", "layer_map")
LAYERWISE = ("uniform", "owl")
NAMED_DATASETS = ("c4", "wikitext2", "self")
# ASCII digits and nothing else: `\d` also takes other scripts' digits, and `$` a trailing newline.
_NM_PATTERN = re.compile(r"([0-9]+):([0-9]+)")
_MAX_SEED = 2**64 - 1  # torch.manual_seed's range
SPARSEGPT_BLOCK = 128  # columns per OBS block of SparseGPT's pass (sparsegpt.prune_with_factor's default)


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """`"2:4"` -> `(2, 4)`; `"unstructured"` -> `None`."""
    match = _NM_PATTERN.fullmatch(pattern)
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass
class OATSConfig(QuantizationConfigMixin):
    """Configuration of a sparse + low-rank (OATS) compression, or of one of its baselines.

    Pass it to `from_pretrained(..., quantization_config=cfg)` (or `oats_config=cfg`) to compress while
    loading, or to [`optimum_oats.compress`] for a model already in memory. It holds the settings every method
    shares; a method's own settings are `method_settings` (each method's dataclass lives next to its `run`).

    Args:
        compression_rate (`float`, defaults to 0.5):
            ρ, the fraction of each compressed layer's parameters removed, in (0, 1).
        rank_ratio (`float`, defaults to 0.1):
            κ, the share of the kept parameters given to the low-rank term (methods with one), in [0, 1). The OATS
            paper uses 0.25–0.3 for 7B+ LLMs and 0.2 for vision transformers (pass `rank_ratio=0.2` there, see
            docs/encoders.md); docs/quality.md compares values on SmolLM2-135M.
        method (`str`, defaults to `"oats"`):
            A one-shot method of the registry (`optimum_oats.algorithms.ALGORITHMS`): `"oats"`, `"hassle"`,
            `"wanda"`, `"sparsegpt"`, `"magnitude"`. `"hassle"` minimises the output error in the full Hessian
            metric (OATS sees only its diagonal): it starts from the OATS solution and alternates SparseGPT pruning
            of `W - L` with the exact Hessian-weighted rank-r fit (HASSLE-free); see docs/quality.md.
        method_settings (dataclass or `dict`, *optional*):
            The method's own settings: an instance of its settings class (`OATSSettings` for `"oats"`,
            `HassleSettings` for `"hassle"`, from `optimum_oats.algorithms`), or a dict of its fields. Unset: the
            method's defaults. The pruning baselines have none. Before this field existed they were flat keywords
            (`num_iterations`, `svd`, `hessian_iterations`, `hessian_shrinkage`); those are still accepted, with a
            `FutureWarning`, for one release, and checkpoints that store them load unchanged.
        sparsity_pattern (`str`, defaults to `"unstructured"`):
            `"unstructured"` (each output row keeps the same number of weights) or `"N:M"` such as `"2:4"`.
            With N:M the sparse part keeps exactly N of every M weights and `compression_rate` is not used:
            the low-rank term gets `rank_ratio` of the total, so the overall kept fraction is `N/M / (1 - κ)`.
        dataset (`str` or `list[str]`, defaults to `"c4"`):
            Calibration text: a list of strings; a local `.txt`/`.jsonl`/`.json` file or dataset folder;
            `"c4"` or `"wikitext2"` (read from `$OATS_DATA_DIR` when set, else from the Hub); or `"self"`
            (text the model generates itself, so no data is needed at all). Encoders and encoder-decoders
            take the same text sources. Vision models (ViT, DINOv2) take images instead: a list of PIL images,
            a folder of image files, or a `datasets.Dataset` with an image column (in memory or saved to disk).
        num_samples (`int`, defaults to 128): calibration sequences.
        seqlen (`int`, defaults to 2048): tokens per calibration sequence.
        seed (`int`, defaults to 0): seeds sampling of calibration windows and any random solver.
        calibration_sampling (`str`, defaults to `"joined"`): how decoder LMs' calibration windows are drawn:
            `"joined"` (documents joined with EOS and cut into windows; every token usable), `"documents"` (the OATS
            reference: consecutive documents from a random start, one sample each) or `"random_windows"` (the
            Wanda/SparseGPT reference: a random window of a random document longer than `seqlen`). Every window
            starts with the tokenizer's BOS where it adds one (Llama-3, Gemma).
        modules_to_not_convert (`list[str]`, *optional*):
            Module names (exact, or a suffix after a `.`) that stay dense. Embeddings, norms and `lm_head` are
            never compressed.
        layerwise (`str`, defaults to `"uniform"`):
            `"uniform"`: every block gets `compression_rate`. `"owl"`: per-block rates from the outlier ratios of
            the dense model (OWL, Yin et al. 2024); the mean over blocks equals `compression_rate` and the
            spread is `2 * owl_lambda`. Works with every method; not with N:M patterns.
        owl_threshold (`float`, defaults to 5.0): OWL's `M`, a score is an outlier above `M ×` the block mean.
        owl_lambda (`float`, defaults to 0.08): OWL's `λ`, half the spread of the per-block rates (the reference's
            value; docs/quality.md compares others).
        refine_steps (`int`, defaults to 0): block refinement, off by default: after each block is compressed, this
            many Adam steps (one calibration sample each) on the kept values of S and on U, V, masks fixed, so the
            block's outputs match the dense block's (3BASiL's transformer matching, Wanda++'s block
            reconstruction). Works with every method; the block is never left worse on its calibration data.
        refine_lr (`float`, *optional*): Adam's learning rate for `refine_steps`. Unset: by the block's compression
            rate (`engine.refine.default_refine_lr`); no single rate is best (docs/quality.md). A block whose
            refinement raises its calibration loss is reverted, with a warning.
        refine_lowrank_lr (`float`, *optional*): Adam's rate for U and V during refinement; `None` (the default)
            uses `refine_lr`, 0 freezes them. Their product moves by about the sum of both factors' steps, so at a
            rate that suits the kept values it can overshoot (docs/quality.md).
        value_bits (`int`, defaults to 16): bits of each kept value of S: 16 stores them in the model's float dtype
            (no quantization); 8, 6, 4 or 3 store `b`-bit codes on a symmetric grid without a zero level (the mask
            says which entries are zero) with one fp16 scale per group (`optimum_oats.algorithms.quantize`).
            SparseGPT and hassle round inside their OBS pass, so each rounding error is compensated on the columns
            not yet placed (the registry's `quantizes_jointly`); OATS, Wanda and magnitude round to nearest after
            the fact (the baselines).
        group_size (`int`, defaults to 128): consecutive input columns of a row sharing one fp16 scale (of the
            values, and of U and V when they are quantized); a divisor or a multiple of SparseGPT's 128-column
            block. Each group costs 16 bits per row: 0.125 bits per weight at 128, 0.25 at 64.
        lowrank_bits (`int`, defaults to 16): bits of U and V: 16 (the model's float dtype), 8 or 4, grouped as
            the values. hassle refits U to the rounded V in its Hessian metric before rounding U; the other
            low-rank methods round both to nearest. Ignored by methods without a low-rank term.
        embedding_bits (`int`, defaults to 16): 8 stores the token embedding, and the LM head tied to it, as int8
            rows with one fp16 scale each (`optimum_oats.nn.quantized_embedding`): half the bytes of a bf16 table
            that is a fifth of a small model, for +0.05% perplexity on SmolLM2-135M; the head reads the codes
            directly. Models with an untied head are refused. It is applied after the blocks are compressed.
        tokenizer (`str` or tokenizer, *optional*), image_processor (`str` or image processor, *optional*):
            Accepted for compatibility and never serialized; they are arguments of a run, so prefer
            `compress(model, cfg, tokenizer, image_processor=...)`. A data set given as objects (PIL images, a
            `datasets.Dataset`) is likewise better passed as `compress(..., dataset=...)`: config.json records only
            a description of it.
        layer_map (`dict`, *optional*): filled by compression: per-module `rank` and `nnz` (nothing else), so that a
            checkpoint can be rebuilt on the meta device with the right shapes. Not set by users; the per-layer
            numbers of a run (errors, OWL ratios) are in `oats_report.json`.

    Example:
    ```python
    >>> cfg = OATSConfig(compression_rate=0.5, rank_ratio=0.25, dataset="c4")
    >>> cfg = OATSConfig(method="hassle", method_settings=HassleSettings(hessian_iterations=3))
    ```
    """

    quant_method: str = field(default=QUANT_METHOD, init=False)
    compression_rate: float = setting(0.5, "Fraction of each layer's parameters removed", "RHO")
    rank_ratio: float = setting(0.1, "Share of the kept parameters given to the low-rank term", "KAPPA")
    method: str = setting("oats", "Compression method", "NAME")
    method_settings: Any = None
    sparsity_pattern: str = setting("unstructured", "`unstructured`, or N:M such as `2:4`", "PATTERN")
    dataset: str | list[str] | Any = setting(
        "c4", "Calibration text: `c4`, `wikitext2`, `self`, or a local .txt/.jsonl/.json file or folder", "DATA"
    )
    num_samples: int = setting(128, "Calibration sequences", "N")
    seqlen: int = setting(2048, "Tokens per calibration sequence", "N")
    seed: int = setting(0, "Seed for calibration sampling", "N")
    calibration_sampling: str = setting(
        "joined",
        "`joined` (documents joined, cut into windows), `documents` (OATS ref.) or `random_windows` (Wanda/SparseGPT)",
        "HOW",
    )
    modules_to_not_convert: list[str] | None = setting(None, "Module names to keep dense", "NAME")
    layerwise: str = setting("uniform", "Per-block rates: `uniform`, or `owl` (outlier-weighted, OWL)", "MODE")
    owl_threshold: float = setting(5.0, "OWL outlier threshold M", "M")
    owl_lambda: float = setting(0.08, "OWL half-spread of the per-block rates", "LAMBDA")
    refine_steps: int = setting(0, "Block refinement: Adam steps per block matching the dense block's outputs", "N")
    refine_lr: float | None = setting(
        None, "Block refinement learning rate; unset: by the block's compression rate (docs/quality.md)", "LR"
    )
    refine_lowrank_lr: float | None = setting(
        None, "Block refinement rate of U and V; unset: the refinement rate, 0: frozen", "LR"
    )
    value_bits: int = setting(NOT_QUANTIZED, "Bits of the kept values: 16 (not quantized), 8, 6, 4 or 3", "B")
    group_size: int = setting(
        DEFAULT_GROUP_SIZE, "Input columns sharing one fp16 scale of the quantized values and factors", "G"
    )
    lowrank_bits: int = setting(NOT_QUANTIZED, "Bits of U and V: 16 (not quantized), 8 or 4", "B")
    embedding_bits: int = setting(NOT_QUANTIZED, "Bits of the token embedding and its tied LM head: 16 or 8", "B")
    tokenizer: Any = None
    image_processor: Any = None
    layer_map: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.quant_method = QUANT_METHOD
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; each error names the field, the value and what is allowed."""
        # Numbers are normalised to built-in int/float (numpy scalars would not serialize to config.json).
        self.compression_rate = _check_float("compression_rate", self.compression_rate, 0.0, 1.0, low_inclusive=False)
        self.rank_ratio = _check_float("rank_ratio", self.rank_ratio, 0.0, 1.0, low_inclusive=True)
        self.num_samples = _check_int("num_samples", self.num_samples, 1)
        self.seqlen = _check_int("seqlen", self.seqlen, 1)
        self.seed = _check_int("seed", self.seed, 0, _MAX_SEED)
        self.refine_steps = _check_int("refine_steps", self.refine_steps, 0)
        if self.refine_lr is not None:
            self.refine_lr = _check_float("refine_lr", self.refine_lr, 0.0, 1.0, low_inclusive=False)
        if self.refine_lowrank_lr is not None:
            self.refine_lowrank_lr = _check_float(
                "refine_lowrank_lr", self.refine_lowrank_lr, 0.0, 1.0, low_inclusive=True
            )
        self._check_quantization()
        if not isinstance(self.method, str) or self.method not in method_names():
            raise ValueError(f"`method` must be one of {method_names()}, got {self.method!r}.")
        settings = self.method_settings
        if isinstance(settings, FlatSettings):  # old flat keywords: the method's own kept, the others had no effect
            settings = settings.taken_by(self.method)
        self.method_settings = resolve_method_settings(self.method, settings)
        if self.calibration_sampling not in SAMPLINGS:
            raise ValueError(f"`calibration_sampling` must be one of {SAMPLINGS}, got {self.calibration_sampling!r}.")
        if self.layerwise not in LAYERWISE:
            raise ValueError(f"`layerwise` must be one of {LAYERWISE}, got {self.layerwise!r}.")
        self.owl_threshold = _check_float("owl_threshold", self.owl_threshold, 0.0, float("inf"), low_inclusive=False)
        self.owl_lambda = _check_float("owl_lambda", self.owl_lambda, 0.0, 0.5, low_inclusive=True)
        if not isinstance(self.sparsity_pattern, str):
            raise TypeError(f"`sparsity_pattern` must be a string, got {type(self.sparsity_pattern).__name__}.")
        if self.layerwise == "owl" and self.sparsity_pattern != "unstructured":
            raise ValueError(
                f"`layerwise='owl'` varies the rate per block, which a fixed `sparsity_pattern="
                f"{self.sparsity_pattern!r}` cannot; use `sparsity_pattern='unstructured'` or `layerwise='uniform'`."
            )
        if self.sparsity_pattern != "unstructured":
            nm = parse_nm(self.sparsity_pattern)
            if nm is None or not 0 < nm[0] < nm[1]:
                raise ValueError(
                    f"`sparsity_pattern` must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4', '2:8'), "
                    f"got {self.sparsity_pattern!r}."
                )
            if self.uses_low_rank and nm[0] / nm[1] / (1 - self.rank_ratio) >= 1:
                raise ValueError(
                    f"`sparsity_pattern={self.sparsity_pattern!r}` with `rank_ratio={self.rank_ratio}` keeps "
                    f"{nm[0] / nm[1] / (1 - self.rank_ratio):.0%} of the weights, so nothing is compressed; "
                    "lower `rank_ratio` or N/M."
                )
        if is_in_memory_dataset(self.dataset):
            pass  # PIL images or a `datasets` dataset (images or text): checked when loaded
        elif isinstance(self.dataset, (list, tuple)):
            if not self.dataset or not all(isinstance(text, str) for text in self.dataset):
                raise ValueError("`dataset` given as a list must be a non-empty list of strings or of PIL images.")
            self.dataset = list(self.dataset)
        elif not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(
                f"`dataset` must be a list of strings, a local path, or one of {NAMED_DATASETS}, got {self.dataset!r}."
            )
        if self.modules_to_not_convert is not None:
            if not isinstance(self.modules_to_not_convert, (list, tuple, set, frozenset)) or not all(
                isinstance(name, str) for name in self.modules_to_not_convert
            ):
                raise ValueError(
                    f"`modules_to_not_convert` must be a list of module names, got {self.modules_to_not_convert!r}."
                )
            self.modules_to_not_convert = list(self.modules_to_not_convert)
        if self.layer_map is not None:
            _check_layer_map(self.layer_map)

    def _check_quantization(self) -> None:
        for key, allowed in (
            ("value_bits", VALUE_BITS),
            ("lowrank_bits", LOWRANK_BITS),
            ("embedding_bits", EMBEDDING_BITS),
        ):
            setattr(self, key, _check_int(key, getattr(self, key), 0))
            if getattr(self, key) not in allowed:
                raise ValueError(f"`{key}` must be one of {allowed} (16: not quantized), got {getattr(self, key)}.")
        self.group_size = _check_int("group_size", self.group_size, 1)
        if SPARSEGPT_BLOCK % self.group_size and self.group_size % SPARSEGPT_BLOCK:
            raise ValueError(
                f"`group_size` must divide {SPARSEGPT_BLOCK} or be a multiple of it (SparseGPT's column block, so a "
                f"group never straddles two blocks), e.g. 32, 64, 128, 256; got {self.group_size}."
            )
        if self.quantized and self.refine_steps:
            raise NotImplementedError(
                f"`refine_steps={self.refine_steps}` with quantization (`value_bits={self.value_bits}`, "
                f"`lowrank_bits={self.lowrank_bits}`): refinement moves values off the quantization grid and is "
                "not supported yet; set `refine_steps=0` or leave both bit widths at 16."
            )
        if self.value_bits != NOT_QUANTIZED and self.sparsity_pattern != "unstructured":
            raise NotImplementedError(
                f"`value_bits={self.value_bits}` with `sparsity_pattern={self.sparsity_pattern!r}` is not supported "
                "yet (the N:M groups are chosen inside a quantization group); use `sparsity_pattern='unstructured'`."
            )

    @property
    def quantized(self) -> bool:
        """Whether the values or the factors are stored as codes (a bit width below 16)."""
        return self.value_bits != NOT_QUANTIZED or self.lowrank_bits != NOT_QUANTIZED

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.sparsity_pattern)

    @property
    def uses_low_rank(self) -> bool:
        """Whether the method keeps a low-rank term (read from the method registry)."""
        return method_info(self.method).uses_low_rank

    @property
    def effective_rank_ratio(self) -> float:
        """κ as used: methods without a low-rank term (the pruning baselines) give it all to the sparse part."""
        return self.rank_ratio if self.uses_low_rank else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Serializable fields only: the tokenizer / image processor is a loading-time input, not a setting.

        In-memory images (PIL images, a `datasets` dataset) are passed by reference, not copied; compression
        replaces them by a short description before anything is written to config.json.
        """
        fields = {k: v for k, v in self.__dict__.items() if k not in _RUNTIME_FIELDS}
        dataset = fields.pop("dataset", None)
        settings = fields.pop("method_settings", None)
        output = copy.deepcopy(fields)
        output["method_settings"] = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings
        output["dataset"] = dataset if is_in_memory_dataset(dataset) else copy.deepcopy(dataset)
        output["quant_method"] = QUANT_METHOD
        return output

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """As the mixin's; a config.json written before `method_settings` (flat keys) loads without a warning."""
        config_dict = {k: v for k, v in config_dict.items() if k != "quant_method"}
        config_dict = fold_flat_settings(config_dict, warn=False)
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def update(self, **kwargs) -> dict[str, Any]:
        """As the mixin's, but the result is validated again: `update` must not bypass `post_init`.

        A flat method setting (`num_iterations=...`) updates that field of `method_settings` (with a FutureWarning);
        a new `method` keeps the settings fields it shares with the old one.
        """
        kwargs = dict(kwargs)
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in FLAT_METHOD_SETTINGS}
        if flat:
            warn_flat(flat, kwargs.get("method", self.method), stacklevel=2)
        if flat or ("method" in kwargs and "method_settings" not in kwargs):
            current = dataclasses.asdict(self.method_settings) if self.method_settings is not None else {}
            kwargs["method_settings"] = FlatSettings({**current, **renamed(flat)})
        unused = super().update(**kwargs)
        self.post_init()
        return unused

    def __getattr__(self, name: str) -> Any:
        """`config.num_iterations` and the other flat method settings, read from `method_settings` (deprecated)."""
        settings = self.__dict__.get("method_settings")
        if name in FLAT_METHOD_SETTINGS and settings is not None and hasattr(settings, FLAT_METHOD_SETTINGS[name]):
            warnings.warn(
                f"`OATSConfig.{name}` is deprecated and will be removed in the next release; read "
                f"`config.method_settings.{FLAT_METHOD_SETTINGS[name]}`.",
                FutureWarning,
                stacklevel=2,
            )
            return getattr(settings, FLAT_METHOD_SETTINGS[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_diff_dict(self) -> dict[str, Any]:
        default = OATSConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or default.get(k) != v}

    def is_skipped(self, module_name: str) -> bool:
        """Exact or dotted-suffix match, so `layers.1.mlp` never also matches `layers.10.mlp`."""
        for name in self.modules_to_not_convert or ():
            if module_name == name or module_name.endswith("." + name):
                return True
        return False


# Loading-time inputs, never serialized.
_RUNTIME_FIELDS = ("tokenizer", "image_processor")


OATSConfig.__init__ = accept_flat_settings(OATSConfig.__init__)


def _check_layer_map(layer_map: Any) -> None:
    """A hand-edited or foreign config.json fails here, naming the entry, not deep inside the model rebuild."""
    if not isinstance(layer_map, dict):
        raise TypeError(
            f"`layer_map` must be a dict of module name -> {{'rank', 'nnz'}}, got {type(layer_map).__name__}."
        )
    for module, entry in layer_map.items():
        if not isinstance(module, str) or not isinstance(entry, dict):
            raise TypeError(f"`layer_map[{module!r}]` must map a module name to a dict with 'rank' and 'nnz'.")
        for key in ("rank", "nnz"):
            if key not in entry:
                raise ValueError(
                    f"`layer_map[{module!r}]` has no {key!r}; the checkpoint's config.json is incomplete."
                )
            _check_int(f"layer_map[{module!r}][{key!r}]", entry[key], 0)
        for key, allowed in (("value_bits", VALUE_BITS), ("lowrank_bits", LOWRANK_BITS)):
            if key in entry and (isinstance(entry[key], bool) or entry[key] not in allowed):
                raise ValueError(f"`layer_map[{module!r}][{key!r}]` must be one of {allowed}, got {entry[key]!r}.")
        for key in ("group_size", "in_features"):
            if key in entry:
                _check_int(f"layer_map[{module!r}][{key!r}]", entry[key], 1)
