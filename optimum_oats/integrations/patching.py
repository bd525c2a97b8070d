"""How this package patches transformers: each patch is declared once, and can be left out or undone.

A patch replaces one attribute (a method of `PreTrainedModel`, a function of a transformers module) with a wrapper
built from the original. The wrapper carries the original, so undoing restores exactly what was there (an inherited
method is inherited again), and applying twice, as a re-import does, changes nothing. `signatures` pins every
transformers callable the wrapper was written against; `tests/integrations/test_patches.py` fails when a
transformers upgrade changes one, so the wrapper is reviewed before it silently drops or misreads an argument.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

_MARK = "__optimum_oats_patch__"  # on a wrapper: the name of the patch that installed it
_ORIGINAL = "__optimum_oats_original__"  # on a wrapper: what the owner held before (None: it was inherited)


def resolve(path: str) -> Any:
    """The object at a dotted path: `"transformers.PreTrainedModel.push_to_hub"`, `"transformers.utils.hub"`."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            found = inspect.getattr_static(found, name) if isinstance(found, type) else getattr(found, name)
        return found
    raise ImportError(f"Cannot import {path!r}.")


def _function(descriptor: Any) -> Any:
    return descriptor.__func__ if isinstance(descriptor, (classmethod, staticmethod)) else descriptor


def original_of(path: str) -> Callable:
    """The transformers function at `path`, unwrapped from this package's patch if one is installed."""
    return inspect.unwrap(_function(resolve(path)), stop=lambda function: not getattr(function, _MARK, None))


def signature_text(function: Callable) -> str:
    """`function`'s parameters, kinds and defaults, without annotations (whose text varies with Python)."""
    signature = inspect.signature(function, follow_wrapped=False)
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


@dataclass(frozen=True)
class Patch:
    """One attribute this package replaces, on each of `owners` (dotted paths of classes or modules).

    Args:
        name: the name that opts out of it (`OATS_NO_PATCH=name`) or undoes it (`undo_patches("name")`).
        wrap: builds the wrapper from the original function (for a classmethod, the function it wraps); the wrapper
            is made with `functools.wraps`, so `__wrapped__` leads back to the original.
        signatures: `{dotted path: signature_text}` of every transformers callable the wrapper relies on.
        effect: what the patch does, and what is lost without it.
    """

    name: str
    attribute: str
    owners: tuple[str, ...]
    wrap: Callable[[Callable], Callable]
    signatures: dict[str, str] = field(default_factory=dict)
    effect: str = ""

    def _owners(self) -> Iterator[Any]:
        for path in self.owners:
            yield resolve(path)

    def _ours(self, owner: Any) -> bool:
        return getattr(_function(vars(owner).get(self.attribute)), _MARK, None) == self.name

    @property
    def applied(self) -> bool:
        return all(self._ours(owner) for owner in self._owners())

    def apply(self) -> None:
        for owner in self._owners():
            if self._ours(owner):
                continue
            held = vars(owner).get(self.attribute)
            current = held if held is not None else inspect.getattr_static(owner, self.attribute)
            wrapper = self.wrap(_function(current))
            setattr(wrapper, _MARK, self.name)
            setattr(wrapper, _ORIGINAL, held)
            setattr(owner, self.attribute, type(current)(wrapper) if _function(current) is not current else wrapper)

    def undo(self) -> None:
        for owner in self._owners():
            if not self._ours(owner):
                continue
            held = getattr(_function(vars(owner)[self.attribute]), _ORIGINAL)
            if held is None:
                delattr(owner, self.attribute)
            else:
                setattr(owner, self.attribute, held)
