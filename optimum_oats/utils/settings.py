"""Declared settings: dataclass fields that carry their command-line help, and the range checks they share.

`OATSConfig` (the settings every method shares) and each method's settings dataclass (next to its `run` in
`algorithms/`) declare their fields with [`setting`]; `optimum_oats.commands.arguments` turns every such field into
a `--flag`, so the CLI is generated from the dataclasses and cannot drift from them.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

# The field metadata keys read by the CLI generator.
HELP, METAVAR = "help", "metavar"


def setting(default: Any, help: str, metavar: str) -> Any:
    """A dataclass field with a default and its `--flag`'s help (one line; the class docstring says why)."""
    return dataclasses.field(default=default, metadata={HELP: help, METAVAR: metavar})


def check_float(
    name: str, value: Any, low: float, high: float, *, low_inclusive: bool, high_inclusive: bool = False
) -> float:
    """`value` as a float in the range; NaN fails every comparison, so it is refused too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__} ({value!r}).")
    interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"`{name}` must be in {interval}, got {value}.") from None
    above_low = number >= low if low_inclusive else number > low
    below_high = number <= high if high_inclusive else number < high
    if not (above_low and below_high):
        raise ValueError(f"`{name}` must be in {interval}, got {value}.")
    return number


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """`value` as a built-in int (numpy integers pass; bools and floats do not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__} ({value!r}).")
    number = int(value)
    if number < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {number}.")
    if maximum is not None and number > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {number}.")
    return number


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
    return value
