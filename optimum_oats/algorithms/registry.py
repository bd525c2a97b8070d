"""The methods this package knows: the single list the config, CLI and model card read.

Each method is one module (its math, its settings dataclass and its [`Algorithm`]); registering it is one line below
(or one `register_algorithm` call for a method defined outside the package). Training-time methods (LoSparse) are
listed too, so that their checkpoints validate and their cards name them, but have no `run`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch

from .budget import LayerBudget
from .hessian_slr import HASSLE
from .method import Algorithm
from .oats import OATS, Decomposition
from .pruning import MAGNITUDE, WANDA
from .quantize import NOT_QUANTIZED, GroupSpec, quantize_rtn
from .sparsegpt import SPARSEGPT


class QuantizationSettings(Protocol):
    """What the engine passes to [`compress_layer`]: `OATSConfig` has these, and this package need not import it."""

    method_settings: Any
    value_bits: int
    group_size: int
    lowrank_bits: int


def value_spec(settings: QuantizationSettings) -> GroupSpec | None:
    """The grid of S's kept values (zero-free: the mask carries the zeros), or None when they are not quantized."""
    bits = getattr(settings, "value_bits", NOT_QUANTIZED)
    return None if bits == NOT_QUANTIZED else GroupSpec(bits, settings.group_size)


def lowrank_spec(settings: QuantizationSettings) -> GroupSpec | None:
    """The grid of U and V (with a zero level: they are dense), or None when they are not quantized."""
    bits = getattr(settings, "lowrank_bits", NOT_QUANTIZED)
    return None if bits == NOT_QUANTIZED else GroupSpec(bits, settings.group_size, zero_level=True)


def compress_layer(
    algorithm: Algorithm,
    weight: torch.Tensor,
    statistics: dict[str, torch.Tensor],
    budget: LayerBudget,
    settings: QuantizationSettings,
) -> Decomposition:
    """Run `algorithm` on one layer with the configured grids in its budget; for a method that does not quantize
    jointly, round what it returns to nearest (S's kept values and U, V each on its own grid), so every method's
    result is on the configured grid."""
    values, factors = value_spec(settings), lowrank_spec(settings)
    budget = dataclasses.replace(budget, values=values, factors=factors)
    decomposition = algorithm.run(weight, statistics, budget, settings.method_settings)
    if algorithm.quantizes_jointly:
        return decomposition
    if values is not None:
        decomposition.sparse, decomposition.value_scales = quantize_rtn(decomposition.sparse, values)
    if factors is not None and decomposition.lowrank_u is not None:
        decomposition.lowrank_u, decomposition.lowrank_u_scales = quantize_rtn(decomposition.lowrank_u, factors)
        decomposition.lowrank_v, decomposition.lowrank_v_scales = quantize_rtn(decomposition.lowrank_v, factors)
    return decomposition


ALGORITHMS: dict[str, Algorithm] = {}
# Methods whose checkpoints this format stores but that `compress()` cannot run.
TRAINED_METHODS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Make `algorithm` a value of `OATSConfig.method` (and of `oats compress --method`, with its settings' flags)."""
    if algorithm.name in ALGORITHMS or algorithm.name in TRAINED_METHODS:
        raise ValueError(f"A method named {algorithm.name!r} is already registered; pick another `name`.")
    (ALGORITHMS if algorithm.one_shot else TRAINED_METHODS)[algorithm.name] = algorithm
    return algorithm


def unregister_algorithm(name: str) -> Algorithm:
    """Remove a method registered by `register_algorithm` (a plug-in's tests, an interactive session)."""
    return ALGORITHMS.pop(name, None) or TRAINED_METHODS.pop(name)


def method_info(name: str) -> Algorithm:
    """The registry entry of a one-shot or training-time method."""
    return ALGORITHMS.get(name) or TRAINED_METHODS[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, one-shot first, as registered now (a plug-in may add one after import)."""
    return (*ALGORITHMS, *TRAINED_METHODS)


def resolve_method_settings(method: str, given: Any) -> Any:
    """`given` as an instance of `method`'s settings dataclass: None gives its defaults, a dict its fields."""
    settings = method_info(method).settings
    if given is None:
        return settings()
    if isinstance(given, dict):
        known = [f.name for f in dataclasses.fields(settings)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(
                f"`method_settings` has {unknown}, which `method={method!r}` does not take; its settings "
                f"({settings.__name__}) are {known or 'none'}."
            )
        return settings(**given)
    if type(given) is not settings:
        raise TypeError(
            f"`method_settings` for `method={method!r}` must be a {settings.__name__} or a dict of its fields, "
            f"got {type(given).__name__}."
        )
    return given


register_algorithm(OATS)
register_algorithm(HASSLE)
register_algorithm(WANDA)
register_algorithm(SPARSEGPT)
register_algorithm(MAGNITUDE)
register_algorithm(Algorithm("losparse", "LoSparse, low-rank + structured sparse", (), uses_low_rank=True))
