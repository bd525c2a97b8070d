"""The spelling of method settings before `OATSConfig.method_settings` existed: flat keywords, for one release.

`OATSConfig(num_iterations=40, svd="exact")` still works, with a FutureWarning naming the new spelling, and a
config.json that stores the flat keys (every checkpoint saved before) loads silently.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

from .algorithms import method_info, method_names

# Method settings that were flat `OATSConfig` fields: old name -> the field of the method's settings dataclass
# (`svd` chose a solver, so it is `OATSSettings.solver` now).
FLAT_METHOD_SETTINGS = {
    "num_iterations": "num_iterations",
    "svd": "solver",
    "hessian_iterations": "hessian_iterations",
    "hessian_shrinkage": "hessian_shrinkage",
}


class FlatSettings(dict):
    """Method settings given as old flat keywords: unlike an explicit `method_settings` dict, the keys the method
    does not take are dropped (they were accepted, and had no effect, before `method_settings` existed)."""

    def taken_by(self, method: str) -> dict[str, Any]:
        known = {f.name for f in dataclasses.fields(method_info(method).settings)}
        return {k: v for k, v in self.items() if k in known}


def renamed(flat: dict[str, Any]) -> dict[str, Any]:
    return {FLAT_METHOD_SETTINGS[k]: v for k, v in flat.items()}


def warn_flat(flat: dict[str, Any], method: Any, stacklevel: int) -> None:
    given = ", ".join(f"`{k}=`" for k in flat)
    settings = FlatSettings(renamed(flat))
    taken = settings.taken_by(method) if method in method_names() else dict(settings)
    ignored = sorted(set(settings) - set(taken))
    if taken:
        fix = f"pass `method_settings={taken!r}` (or the method's settings dataclass, e.g. `OATSSettings`)"
        if ignored:
            fix += f"; {ignored} had and have no effect with `method={method!r}`"
    else:
        fix = f"drop them: they had and have no effect with `method={method!r}`"
    warnings.warn(
        f"Flat method settings ({given}) are deprecated and will be removed in the next release: {fix}.",
        FutureWarning,
        stacklevel=stacklevel + 1,
    )


def fold_flat_settings(kwargs: dict[str, Any], *, warn: bool) -> dict[str, Any]:
    """`kwargs` with the old flat method settings moved into `method_settings`."""
    flat = {k: v for k, v in kwargs.items() if k in FLAT_METHOD_SETTINGS}
    if not flat:
        return kwargs
    if kwargs.get("method_settings") is not None:
        raise ValueError(
            f"Give the method's settings once: `method_settings` or the flat {sorted(flat)} (deprecated), not both."
        )
    if warn:
        warn_flat(flat, kwargs.get("method", "oats"), stacklevel=3)
    rest = {k: v for k, v in kwargs.items() if k not in FLAT_METHOD_SETTINGS}
    return {**rest, "method_settings": FlatSettings(renamed(flat))}


def accept_flat_settings(init):
    """`OATSConfig(num_iterations=40)` (the spelling before `method_settings`) still works, with a FutureWarning."""

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **fold_flat_settings(kwargs, warn=True))

    return __init__
