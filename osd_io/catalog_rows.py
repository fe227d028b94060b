"""One catalog row: the dataclass that is the only definition of the schema, and its arrow form.

:data:`SCHEMA` (pyarrow) is derived from :class:`CatalogRow`'s type hints, so the two cannot drift;
the Delta table (:mod:`osd_io.catalog`) and the old parquet parts (:mod:`osd_io.catalog_parts`)
are both read into it. :func:`dedup` is the catalog's one rule for an artifact stored more than
once: an ``ok`` row beats a ``failed`` one, then the earliest wins.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from osd_core.errors import OSDError
from osd_io.keys import safe_name

__all__ = ["COLUMNS", "SCHEMA", "STATUSES", "CatalogError", "CatalogRow", "NoneMeetsError", "dedup", "rows_to_table"]

STATUSES = ("ok", "failed")


class CatalogError(OSDError):
    """The catalog cannot be read or written as asked."""


class NoneMeetsError(CatalogError, LookupError):
    """No artifact of the model meets the requested accuracy; the message says the best one."""


def _package_version() -> str:
    try:
        return importlib.metadata.version("osd-fleet")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CatalogRow:
    """One compressed artifact (or failed attempt) of one model revision.

    ``bytes`` is the artifact's size on storage; ``budget_bits`` the bit budget it was
    compressed to and ``paper_bits`` the cost as the paper counts it. ``eval_data`` identifies
    the evaluation set by the sha256 of its file, ``sha256`` the artifact by its manifest.
    ``accuracy`` holds the measured value of ``metric`` (accuracy, ``acc``, ``acc_norm``, or
    ``perplexity``), and ``higher_is_better`` says which way is better, so queries can refuse a
    floor on a lower-is-better metric. ``params`` is a JSON object (a mapping given here is
    serialised with sorted keys).
    """

    model: str
    revision: str
    base: str
    method: str
    rank: float  # r (a whole number reads back as an int)
    extra_rank: float  # c = k - r
    allocation: str
    budget_bits: int
    paper_bits: int
    bytes: int
    accuracy: float | None = None
    metric: str
    higher_is_better: bool = True
    eval_data: str
    uri: str
    sha256: str
    artifact_id: str
    osd_fleet_version: str = dataclasses.field(default_factory=_package_version)
    created: dt.datetime = dataclasses.field(default_factory=_utcnow)
    status: str = "ok"
    params: str = "{}"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if isinstance(self.params, Mapping):
            set_("params", json.dumps(dict(self.params), sort_keys=True))
        for f in dataclasses.fields(self):
            hint, value = _HINTS[f.name], getattr(self, f.name)
            if f.name in RANK_COLUMNS:
                set_(f.name, _rank_number(f.name, value))
            elif hint is int and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{f.name} must be an int >= 0, got {value!r}")
            if hint is str and not isinstance(value, str):
                raise ValueError(f"{f.name} must be a str, got {type(value).__name__}: {value!r}")
            if hint is bool and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
        safe_name(self.model)
        safe_name(self.revision)
        if not self.artifact_id:
            raise ValueError("artifact_id must not be empty")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.accuracy is not None:
            if isinstance(self.accuracy, bool) or not isinstance(self.accuracy, (int, float)):
                raise ValueError(f"accuracy must be a float or None, got {self.accuracy!r}")
            if not math.isfinite(self.accuracy):
                raise ValueError(f"accuracy must be finite (None when unmeasured), got {self.accuracy!r}")
            set_("accuracy", float(self.accuracy))
        if not isinstance(self.created, dt.datetime) or self.created.tzinfo is None:
            raise ValueError(f"created must be a timezone-aware datetime, got {self.created!r}")
        created = self.created.astimezone(dt.UTC)
        if hasattr(created, "to_pydatetime"):  # pandas.Timestamp -> plain datetime
            created = created.to_pydatetime()
        set_("created", created)
        try:
            params = json.loads(self.params)
        except ValueError as exc:
            raise ValueError(f"params must be a JSON object, got {self.params[:80]!r}: {exc}") from None
        if not isinstance(params, dict):
            raise ValueError(f"params must be a JSON object, got {self.params[:80]!r}")

    def to_record(self) -> dict[str, Any]:
        """The row as a plain dict (column name -> value), in schema order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CatalogRow:
        """Build a row from a dict as pandas or pyarrow give it (numpy scalars, NaN, Timestamp)."""
        values: dict[str, Any] = {}
        for name, hint in _HINTS.items():
            value = record[name]
            if name == "accuracy":
                value = None if value is None or pd.isna(value) else float(value)
            elif name in RANK_COLUMNS:
                value = _rank_number(name, value)
            elif hint is bool:
                value = bool(value)
            elif hint is int:
                value = int(value)
            elif hint is str:
                value = str(value)
            values[name] = value
        return cls(**values)

    @property
    def params_dict(self) -> dict[str, Any]:
        return json.loads(self.params)


_HINTS: dict[str, Any] = typing.get_type_hints(CatalogRow)
RANK_COLUMNS = ("rank", "extra_rank")  # fractional budgets, but whole ones read back as ints


def _rank_number(name: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return int(value) if float(value).is_integer() else float(value)


def _arrow_field(name: str, hint: Any) -> pa.Field:
    args = typing.get_args(hint)
    nullable = isinstance(hint, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if nullable else hint
    arrow = {
        bool: pa.bool_(),
        int: pa.int64(),
        float: pa.float64(),
        str: pa.string(),
        dt.datetime: pa.timestamp("us", tz="UTC"),
    }[base]
    return pa.field(name, arrow, nullable=nullable)


SCHEMA: pa.Schema = pa.schema([_arrow_field(f.name, _HINTS[f.name]) for f in dataclasses.fields(CatalogRow)])
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


def rows_to_table(rows: Sequence[CatalogRow]) -> pa.Table:
    """Rows -> an arrow table in :data:`SCHEMA`."""
    return pa.Table.from_pylist([r.to_record() for r in rows], schema=SCHEMA)


def dedup(df: pd.DataFrame) -> pd.DataFrame:
    """One row per artifact_id: ok before failed, then earliest created, then earliest ``_part``; oldest first."""
    if "_part" not in df:
        df = df.assign(_part=0)
    df = df.assign(_failed=df["status"] != "ok")
    df = df.sort_values(["artifact_id", "_failed", "created", "_part"], kind="stable")
    df = df.drop_duplicates("artifact_id", keep="first")
    df = df.sort_values(["created", "artifact_id"], kind="stable")
    return df.drop(columns=["_failed", "_part"]).reset_index(drop=True)
