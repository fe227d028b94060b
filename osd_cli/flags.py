"""Command-line flags derived from the settings dataclasses, so each setting is declared once.

``CompressionConfig``, ``SweepSpec`` and ``ModelSpec`` declare every setting with its help text
and choices (``osd_core.settings.setting``); the fleet file's tables and the flows' parameters
are read into the same classes. Here each field becomes a flag named after it
(``extra_rank`` → ``--extra-rank``, a tuple field takes ``a,b,c``), so a new setting needs no
parser code, and the help a user reads is the field's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from osd_cli.arguments import comma_list, number


def add_settings(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] | None = None,
) -> None:
    """One flag per field of dataclass ``cls`` (but ``skip`` and nested tables).

    ``defaults`` overrides the class's defaults; ``flags`` renames a flag (``{"name": "model"}``).
    A field without a default becomes a required flag.
    """
    hints = typing.get_type_hints(cls)
    skip, defaults, flags = set(skip), dict(defaults or {}), dict(flags or {})
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata or dataclasses.is_dataclass(hints[f.name]):
            continue
        default = defaults.get(f.name, _default(f))
        flag = "--" + flags.get(f.name, f.name).replace("_", "-")
        hint, meta = hints[f.name], f.metadata
        options: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if default is dataclasses.MISSING:
            options["required"] = True
        elif default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            options["help"] += f" (default: {shown})"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **options)
            continue
        parse, many = _item_type(hint)
        if many:
            options["metavar"] = "A,B,…"
            parser.add_argument(flag, type=comma_list(parse), default=default, **options)
            continue
        if "choices" in meta:
            options["choices"] = meta["choices"]
        parser.add_argument(flag, type=parse, default=default, **options)


def read_settings(args: argparse.Namespace, cls: type, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The values of the flags :func:`add_settings` made, by field name."""
    skip = set(skip)
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and hasattr(args, f.name)}


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _item_type(hint: Any) -> tuple[Callable[[str], Any], bool]:
    """The parser of one value, and whether the field holds a tuple of them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        return _item_type(args[0])[0], True
    values = [a for a in args if a is not type(None)] if args else [hint]
    if set(values) == {int, float}:
        return number, False
    return values[0], False
