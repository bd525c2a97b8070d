"""The methods this package knows: the single list the config, CLI and model card read.

Each method is one module (its math, its settings dataclass and its [`Algorithm`]); registering it is one line below
(or one `register_algorithm` call for a method defined outside the package). Training-time methods (LoSparse) are
listed too, so that their checkpoints validate and their cards name them, but have no `run`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .hessian_slr import HASSLE
from .method import Algorithm
from .oats import OATS
from .pruning import MAGNITUDE, WANDA
from .sparsegpt import SPARSEGPT

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
