"""Settings declared once as dataclass fields, and read from tables (TOML, JSON) by their types.

A setting's default, help text and choices live on its field (:func:`setting`). The command
line (``osd_cli.flags``), the fleet file and the flows' JSON parameters all derive from that one
declaration: :func:`from_table` reads a mapping into the dataclass by its type hints, refusing
unknown keys and wrong types with the dotted path of the value (``sweep.compression.seed``), and
the class's own ``__post_init__`` then checks ranges and combinations.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")
REQUIRED: Any = dataclasses.MISSING  # a setting with no default


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None, *, factory: bool = False) -> Any:
    """A settings field: its default (a factory when ``factory``; :data:`REQUIRED` for none), the
    help users read, and its choices."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    if factory:
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def from_table(cls: type[T], data: Any, where: str = "") -> T:
    """``cls`` built from ``data``, each value checked against its field's type hint.

    ``where`` is the table's dotted path in messages (empty for the top level).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the file'} must be a table/object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or 'the file'}: unknown field {unknown[0]!r}; expected {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    missing = sorted(name for name, f in fields.items() if name not in data and _required(f))
    if missing:
        raise ConfigError(f"{where or 'the file'}: missing field {missing[0]!r}")
    values = {name: _value(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()}
    return cls(**values)


def to_table(settings: Any) -> dict[str, Any]:
    """The inverse of :func:`from_table`: a settings dataclass as plain JSON values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _value(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_table(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list of {_name(args[0])}, got {value!r}")
        return tuple(_value(args[0], item, f"{where}[{number}]") for number, item in enumerate(value, start=1))
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            if _matches(arm, value):
                return value
        raise ConfigError(f"{where} must be {_name(hint)}, got {value!r}")
    if hint is Any or _matches(hint, value):
        return value
    raise ConfigError(f"{where} must be {_name(hint)}, got {value!r}")


def _matches(hint: Any, value: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (int, str):
        return isinstance(value, hint) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)


def _name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_name(a) for a in args) + (" or null" if type(None) in typing.get_args(hint) else "")
    if typing.get_origin(hint) is tuple:
        return f"a list of {_name(args[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )
