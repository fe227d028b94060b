"""The catalog of compressed artifacts: one schema, append-only parquet parts in the store.

Design, and why:

* **Immutable parts, no shared file.** Each :meth:`Catalog.append` writes one new parquet file
  ``catalog/parts/<UTC time>-<uuid4>.parquet`` with a conditional write (``if_absent``), next
  to the artifacts in the same object store. Appenders never read-modify-write a common object,
  so any number of workers (threads, processes, hosts) can append at once with no locks and no
  lost updates; S3 has no cheap locks, and a single catalog file would need them.
* **All or nothing.** A part is published by one atomic PUT (or rename, locally), so a reader
  sees a whole part or none of it, never a partial row.
* **Idempotent by ``artifact_id``.** Readers list ``catalog/parts/``, concatenate, and keep one
  row per ``artifact_id``: an ``ok`` row beats a ``failed`` one, then the earliest ``created``
  wins. A rerun that appends the same artifact again changes nothing visible; a retry that
  succeeds after a failure replaces the failure.
* **Bounded reads.** A read costs one LIST and one GET per part, and every run appends parts.
  :meth:`Catalog.compact` writes the merged rows as one new part, then deletes only the parts it
  read; a reader in between sees duplicates, which the deduplication removes, and parts
  appended meanwhile are untouched. The flow compacts once a catalog holds more than
  :data:`COMPACT_AFTER_PARTS` parts (``bench/catalog_read.py`` measures why).
* **One schema.** :class:`CatalogRow` is the only definition; :data:`SCHEMA` (pyarrow) is derived
  from its type hints, so the two cannot drift.

Other tools can read the parts directly (without the deduplication), e.g.
``pyarrow.dataset.dataset("bucket/prefix/catalog/parts/", format="parquet",
filesystem=pyarrow.fs.S3FileSystem(endpoint_override=...))`` or the glob
``s3://bucket/prefix/catalog/parts/*.parquet``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import math
import types
import typing
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from osd_core.errors import OSDError
from osd_io.keys import safe_name
from osd_io.storage import AlreadyExistsError, NotFoundError, ObjectStore

__all__ = [
    "CATALOG_FORMAT",
    "PARTS_PREFIX",
    "SCHEMA",
    "Catalog",
    "CatalogError",
    "CatalogRow",
    "NoneMeetsError",
]

PARTS_PREFIX = "catalog/parts/"
# Stamped into each part's schema metadata; readers refuse newer formats. 2: rank and extra_rank
# became float64 (fractional budgets); format-1 parts (int64) are read and cast. 3: the metric's
# direction (``higher_is_better``: perplexity is lower-is-better); older parts hold accuracy only.
CATALOG_FORMAT = 3
COMPACT_AFTER_PARTS = 32
_FORMAT_KEY = b"osd_fleet.catalog_format"
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


SCHEMA: pa.Schema = pa.schema(
    [_arrow_field(f.name, _HINTS[f.name]) for f in dataclasses.fields(CatalogRow)],
    metadata={_FORMAT_KEY: str(CATALOG_FORMAT).encode()},
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)


def rows_to_table(rows: Sequence[CatalogRow]) -> pa.Table:
    """Rows -> an arrow table in :data:`SCHEMA`."""
    return pa.Table.from_pylist([r.to_record() for r in rows], schema=SCHEMA)


def _human_bytes(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{n} B" if unit == "B" else f"{value:.3g} {unit}"


class Catalog:
    """The artifact catalog stored under ``catalog/parts/`` of an :class:`ObjectStore`."""

    def __init__(self, store: ObjectStore, *, max_workers: int = 8) -> None:
        self.store = store
        self.max_workers = max_workers

    def __repr__(self) -> str:
        return f"Catalog({self.store!r})"

    # -- writing

    def append(self, rows: Sequence[CatalogRow]) -> str | None:
        """Publish ``rows`` as one new immutable part; return its key (None for no rows)."""
        rows = list(rows)
        for row in rows:
            if not isinstance(row, CatalogRow):
                raise TypeError(f"append takes CatalogRow objects, got {type(row).__name__}")
        if not rows:
            return None
        return self._write_part(rows_to_table(rows))

    def _write_part(self, table: pa.Table) -> str:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        while True:  # a uuid4 collision is practically impossible; never overwrite if it happens
            key = f"{PARTS_PREFIX}{_utcnow():%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}.parquet"
            try:
                self.store.put_bytes(key, data, if_absent=True)
                return key
            except AlreadyExistsError:
                continue

    def compact(self, *, min_parts: int = 2) -> str | None:
        """Merge all current parts into one once there are ``min_parts``; return the new part's key.

        None when there was nothing to do. Safe beside appenders and readers (see the module
        docstring); two compactions at once leave two merged parts, which reads deduplicate.
        """
        keys = self._part_keys()
        if len(keys) < max(2, min_parts):
            return None
        merged = self._dedup(self._read_parts(keys))
        new_key = self._write_part(pa.Table.from_pandas(merged, schema=SCHEMA, preserve_index=False))
        for key in keys:  # only what we merged: parts appended meanwhile stay
            self.store.delete(key)
        return new_key

    def part_count(self) -> int:
        return len(self._part_keys())

    # -- reading

    def _part_keys(self) -> list[str]:
        return [k for k in self.store.list(PARTS_PREFIX) if k.endswith(".parquet")]

    def _read_part(self, key: str) -> pa.Table:
        data = self.store.get_bytes(key, verify=True)
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:  # a foreign or damaged object: refused, never guessed at
            raise CatalogError(
                f"catalog part {self.store.uri_for(key)} is not a readable parquet file: {exc}"
            ) from None
        version = int((table.schema.metadata or {}).get(_FORMAT_KEY, b"0"))
        if version > CATALOG_FORMAT:
            raise CatalogError(
                f"catalog part {self.store.uri_for(key)} has format {version}; this osd-fleet "
                f"reads up to {CATALOG_FORMAT}: upgrade osd-fleet"
            )
        if "higher_is_better" not in table.column_names:  # format 1 and 2 parts: accuracy, higher is better
            table = table.append_column("higher_is_better", pa.array([True] * table.num_rows, pa.bool_()))
        missing = set(COLUMNS) - set(table.column_names)
        if missing:
            raise CatalogError(f"catalog part {self.store.uri_for(key)} lacks columns {sorted(missing)}")
        return table.select(list(COLUMNS)).cast(SCHEMA)

    def _read_parts(self, keys: Sequence[str]) -> pd.DataFrame:
        if not keys:
            return SCHEMA.empty_table().to_pandas()
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(keys))) as pool:
            tables = list(pool.map(self._read_part, keys))
        frames = []
        for order, table in enumerate(tables):
            frame = table.to_pandas()
            frame["_part"] = order  # keys are sorted by time: a tiebreak for equal `created`
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    @staticmethod
    def _dedup(df: pd.DataFrame) -> pd.DataFrame:
        """One row per artifact_id: ok before failed, then earliest created, then earliest part."""
        if "_part" not in df:
            df = df.assign(_part=0)
        df = df.assign(_failed=df["status"] != "ok")
        df = df.sort_values(["artifact_id", "_failed", "created", "_part"], kind="stable")
        df = df.drop_duplicates("artifact_id", keep="first")
        df = df.sort_values(["created", "artifact_id"], kind="stable")
        return df.drop(columns=["_failed", "_part"]).reset_index(drop=True)

    def read(self) -> pd.DataFrame:
        """The whole catalog, one row per artifact_id, oldest first (empty frame if none)."""
        for attempt in range(3):
            try:
                return self._dedup(self._read_parts(self._part_keys()))
            except NotFoundError:  # a concurrent compact() deleted a listed part: list again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def rows(self, model: str | None = None) -> list[CatalogRow]:
        """Catalog rows as :class:`CatalogRow`, optionally for one model."""
        df = self.read()
        if model is not None:
            df = df[df["model"] == model]
        return [CatalogRow.from_record(r) for r in df.to_dict("records")]

    def smallest(
        self, model: str, at_least: float | None = None, *, at_most: float | None = None, metric: str | None = None
    ) -> CatalogRow:
        """The smallest successful artifact of ``model`` whose ``metric`` is ``>= at_least`` or ``<= at_most``.

        Give exactly one bound, the one that fits the metric's direction: a floor for accuracy, a
        ceiling for perplexity; the other is refused. ``metric`` is needed when the model's rows
        measure several. Ties on size go to the better score. Raises NoneMeetsError saying what
        is closest.
        """
        if (at_least is None) == (at_most is None):
            raise CatalogError("give exactly one bound: at_least (a floor) or at_most (a ceiling)")
        rows = [r for r in self.rows(model) if metric is None or r.metric == metric]
        ok = [r for r in rows if r.status == "ok"]
        label = f"model {model!r}" + (f" (metric {metric!r})" if metric else "")
        if not ok:
            failed = len(rows) - len(ok)
            raise NoneMeetsError(
                f"no successful artifacts of {label} in the catalog"
                + (f" ({failed} failed)" if failed else "")
            )
        measured = [r for r in ok if r.accuracy is not None]
        metrics = sorted({r.metric for r in measured})
        if len(metrics) > 1:
            raise CatalogError(f"{label} has rows measuring {', '.join(metrics)}: name one with metric")
        name = metrics[0] if metrics else metric or "accuracy"
        higher = all(r.higher_is_better for r in measured)
        if measured and higher != (at_least is not None):
            wanted, given = ("a floor (at least)", "a ceiling") if higher else ("a ceiling (at most)", "a floor")
            raise CatalogError(f"{name} of {label} is {'higher' if higher else 'lower'}-is-better: ask for {wanted}, "
                               f"not {given}")
        bound = float(at_least if at_least is not None else at_most)  # type: ignore[arg-type]
        sign = 1.0 if higher else -1.0  # compare as "higher is better"
        meets = [r for r in measured if sign * r.accuracy >= sign * bound]
        if meets:
            return min(meets, key=lambda r: (r.bytes, -sign * r.accuracy, r.created))
        head = f"none of {len(ok)} artifacts of {label} meets {name} {'>=' if higher else '<='} {bound:g}"
        if not measured:
            raise NoneMeetsError(f"{head}; none has a measured {name}")
        best = max(measured, key=lambda r: (sign * r.accuracy, -r.bytes))
        raise NoneMeetsError(f"{head}; best is {best.accuracy:.4g} at {_human_bytes(best.bytes)}")
