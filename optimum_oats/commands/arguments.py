"""`oats compress`'s compression flags, generated from `OATSConfig` and each registered method's settings dataclass.

Every field declared with `utils.settings.setting` becomes `--field-name` (help, metavar and default from the field),
so the command line cannot drift from the config: a new `OATSConfig` field, or a new method registered with its
settings, gets its flag with no other edit. Fields only Python can set are `config.PYTHON_ONLY_FIELDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from ..algorithms import method_info, method_names
from ..config import FLAT_METHOD_SETTINGS, PYTHON_ONLY_FIELDS, OATSConfig
from ..utils.settings import HELP, METAVAR

_SCALARS = (int, float, str)


@dataclass(frozen=True)
class Flag:
    """One generated flag: `dest` is the dataclass field; `methods` the methods whose settings hold it (none for a
    shared `OATSConfig` field)."""

    dest: str
    field: dataclasses.Field
    kind: type
    many: bool
    methods: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """`--solver` and, for a setting renamed from an old flat field, the old spelling (`--svd`) as an alias."""
        old = [name for name, new in FLAT_METHOD_SETTINGS.items() if new == self.dest and name != self.dest]
        return tuple("--" + name.replace("_", "-") for name in (self.dest, *old))


def _kind(hint: Any, owner: type, name: str) -> tuple[type, bool]:
    """`(type, many)` of a field's annotation: a scalar wins over a list (`dataset: str | list[str]` is one path)."""
    options = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    for option in options:
        if option in _SCALARS:
            return option, False
    for option in options:
        if typing.get_origin(option) is list and typing.get_args(option)[0] in _SCALARS:
            return typing.get_args(option)[0], True
    raise TypeError(f"`{owner.__name__}.{name}` ({hint}) has no command-line form; declare it as int, float or str.")


def _flags_of(owner: type, methods: tuple[str, ...] = ()) -> list[Flag]:
    hints = typing.get_type_hints(owner)
    flags = []
    for f in dataclasses.fields(owner):
        if HELP in f.metadata:
            kind, many = _kind(hints[f.name], owner, f.name)
            flags.append(Flag(f.name, f, kind, many, methods))
    return flags


def config_flags() -> list[Flag]:
    """The shared `OATSConfig` flags, then each registered method's settings flags (one flag per field name)."""
    flags = {flag.dest: flag for flag in _flags_of(OATSConfig)}
    for method in method_names():
        for flag in _flags_of(method_info(method).settings, (method,)):
            if flag.dest in flags:
                known = flags[flag.dest]
                flags[flag.dest] = dataclasses.replace(known, methods=(*known.methods, method))
            else:
                flags[flag.dest] = flag
    return list(flags.values())


def undeclared_fields(config_class: type = OATSConfig) -> list[str]:
    """Config fields with neither a flag nor a place in `PYTHON_ONLY_FIELDS` (a test keeps this empty)."""
    declared = {flag.dest for flag in _flags_of(config_class)}
    return [f.name for f in dataclasses.fields(config_class) if f.name not in declared | set(PYTHON_ONLY_FIELDS)]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every generated flag; each defaults to None, so that the dataclasses stay the one source of defaults."""
    groups: dict[str, Any] = {}
    for flag in config_flags():
        title = "compression (OATSConfig)" if not flag.methods else f"settings of --method {flag.methods[0]}"
        group = groups.setdefault(title, parser.add_argument_group(title))
        help_text = flag.field.metadata[HELP]
        if flag.dest == "method":
            help_text += f": {', '.join(n for n in method_names() if method_info(n).one_shot)}"
        if flag.methods[1:]:
            help_text += f"; methods {', '.join(flag.methods)}"
        default = flag.field.default
        group.add_argument(
            *flag.names,
            dest=flag.dest,
            type=flag.kind,
            nargs="+" if flag.many else None,
            default=None,
            metavar=flag.field.metadata[METAVAR],
            help=f"{help_text} (default: {'unset' if default is None else default}).",
        )


def config_from_args(args: argparse.Namespace) -> OATSConfig:
    """An `OATSConfig` from the flags given; flags left out keep the dataclasses' defaults. A method setting given
    for a method that does not take it is an error, not silently dropped."""
    flags = config_flags()
    given = {flag.dest: getattr(args, flag.dest) for flag in flags if getattr(args, flag.dest, None) is not None}
    shared = {flag.dest: given[flag.dest] for flag in flags if not flag.methods and flag.dest in given}
    method = shared.get("method", OATSConfig.__dataclass_fields__["method"].default)
    own = {}
    for flag in flags:
        if flag.methods and flag.dest in given:
            if method in method_names() and method not in flag.methods:
                raise ValueError(
                    f"`{flag.names[0]}` is a setting of --method {' / '.join(flag.methods)}, not of --method "
                    f"{method}; drop it or pick one of those methods."
                )
            own[flag.dest] = given[flag.dest]
    return OATSConfig(**shared, method_settings=own or None)
