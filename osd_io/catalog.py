"""The catalog of compressed artifacts: a Delta Lake table in the same store as the artifacts.

Design, and why:

* **A table format other tools read.** The catalog is the Delta table ``catalog/`` of the store
  (``s3://bucket/prefix/catalog`` or ``<root>/catalog``): pandas (``deltalake.DeltaTable(uri)
  .to_pandas()``), DuckDB, Spark and Polars read it with no osd-fleet code.
* **One row per artifact, in the table itself.** :meth:`Catalog.append` is a Delta ``MERGE`` on
  ``artifact_id``: a new artifact is inserted, an ``ok`` row replaces a ``failed`` one, and
  anything else is left as it is. So a rerun changes nothing (and commits nothing), a retry
  that succeeds replaces its failure, and outside readers never see duplicates.
* **Concurrent writers, no locks.** A Delta commit is one conditional create of the next log
  entry (S3 ``If-None-Match``; a hard link locally). Two writers that race are told so
  (:class:`deltalake.exceptions.CommitFailedError`) and the loser merges again against the new
  version, so any number of flows can append at once with no lost and no doubled rows.
* **All or nothing.** Rows become visible only with their commit: a crash leaves at most data
  files no log entry names, which readers ignore and :meth:`Catalog.compact` vacuums.
* **Bounded reads.** Every commit adds a file. The flow calls :meth:`Catalog.compact`
  (``OPTIMIZE`` then ``VACUUM``) once the table holds more than :data:`COMPACT_AFTER_FILES`, as
  ``osd-fleet catalog compact`` does on demand; delta-rs checkpoints the log every 100 commits.
* **Old catalogs move once.** Catalogs of formats 1 to 3 were parquet parts under
  ``catalog/parts/`` (:mod:`osd_io.catalog_parts`). While any part is there the catalog refuses
  to work and names ``osd-fleet catalog migrate``; a vacuum would otherwise delete the parts,
  which Delta does not know.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import pandas as pd
import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from osd_core.config import VACUUM_RETAIN_HOURS
from osd_io.catalog_parts import PARTS_PREFIX, part_keys, read_parts
from osd_io.catalog_rows import COLUMNS, SCHEMA, CatalogError, CatalogRow, NoneMeetsError, dedup, rows_to_table
from osd_io.storage import ObjectStore

__all__ = [
    "CATALOG_FORMAT",
    "COMPACT_AFTER_FILES",
    "SCHEMA",
    "TABLE_KEY",
    "Catalog",
    "CatalogError",
    "CatalogRow",
    "Compaction",
    "Migration",
    "NoneMeetsError",
]

TABLE_KEY = "catalog"
# In the table's configuration; readers refuse newer formats. 1-3 were parquet parts; 4 is Delta.
CATALOG_FORMAT = 4
FORMAT_PROPERTY = "osd_fleet.catalog_format"
COMPACT_AFTER_FILES = 32
ORPHAN_HOURS = 1
COMMIT_ATTEMPTS = 40  # 8 writers racing on one table needed at most 17 retries in 10 merges each
_MERGE_ON = "t.artifact_id = s.artifact_id"
_OK_REPLACES_FAILED = "t.status <> 'ok' AND s.status = 'ok'"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Compaction:
    """What :meth:`Catalog.compact` did: data files before and after, and files vacuumed."""

    files_before: int
    files_after: int
    vacuumed: int


@dataclasses.dataclass(frozen=True)
class Migration:
    """What :meth:`Catalog.migrate` moved: parquet parts read and deleted, their distinct rows, rows now new."""

    parts: int
    rows: int
    added: int


def _human_bytes(n: int) -> str:
    value, unit = float(n), "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    return f"{n} B" if unit == "B" else f"{value:.3g} {unit}"




class Catalog:
    """The artifact catalog: the Delta table ``catalog/`` of an :class:`ObjectStore`."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.location = store.table_location(TABLE_KEY)

    def __repr__(self) -> str:
        return f"Catalog({self.store!r})"

    @property
    def uri(self) -> str:
        """The table's URI, for other tools (the options, credentials included, stay with the store)."""
        return self.location.uri

    # -- the table

    def _open(self, *, migrating: bool = False) -> DeltaTable | None:
        """The table at its latest version (None before the first append), after the format checks."""
        if not migrating and part_keys(self.store):
            parts = self.store.uri_for(PARTS_PREFIX.rstrip("/"))
            store = parts.removesuffix("/" + PARTS_PREFIX.rstrip("/"))
            raise CatalogError(
                f"the catalog at {parts} is in the parquet-parts layout of osd-fleet 0.1; move it into the "
                f"Delta table once with: osd-fleet catalog migrate --store {store}"
            )
        try:
            table = _delta_call(
                f"open the catalog {self.uri}",
                lambda: DeltaTable(self.location.uri, storage_options=self.location.storage_options),
            )
        except TableNotFoundError:
            return None
        configured = table.metadata().configuration.get(FORMAT_PROPERTY)
        if configured is None or not configured.isdigit():
            raise CatalogError(f"{self.uri} is a Delta table but not an osd-fleet catalog (no {FORMAT_PROPERTY})")
        if int(configured) > CATALOG_FORMAT:
            raise CatalogError(
                f"the catalog {self.uri} has format {configured}; this osd-fleet reads up to "
                f"{CATALOG_FORMAT}: upgrade osd-fleet"
            )
        return table

    def _create(self) -> DeltaTable:
        """Create the empty table; a concurrent creator that wins first is fine (``mode="ignore"``)."""
        try:
            return _delta_call(
                f"create the catalog {self.uri}",
                lambda: DeltaTable.create(
                    self.location.uri,
                    SCHEMA,
                    mode="ignore",
                    name="osd_fleet_catalog",
                    configuration={FORMAT_PROPERTY: str(CATALOG_FORMAT)},
                    storage_options=self.location.storage_options,
                    raise_if_key_not_exists=False,
                ),
            )
        except CommitFailedError:  # another writer created it between our check and our create
            table = self._open(migrating=True)
            assert table is not None
            return table

    # -- writing

    def append(self, rows: Sequence[CatalogRow]) -> int | None:
        """Merge ``rows`` into the table in one commit; return its version (None if nothing changed)."""
        rows = list(rows)
        for row in rows:
            if not isinstance(row, CatalogRow):
                raise TypeError(f"append takes CatalogRow objects, got {type(row).__name__}")
        if not rows:
            return None
        return self._merge(rows, migrating=False)

    def _merge(self, rows: Sequence[CatalogRow], *, migrating: bool) -> int | None:
        # One row per artifact in the source too: a MERGE refuses two source rows matching one target row.
        frame = dedup(rows_to_table(rows).to_pandas())
        source = pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)

        def merge_once() -> int | None:
            table = self._open(migrating=migrating) or self._create()
            before = table.version()
            merger = (
                table.merge(source, predicate=_MERGE_ON, source_alias="s", target_alias="t")
                .when_matched_update_all(predicate=_OK_REPLACES_FAILED)
                .when_not_matched_insert_all()
            )
            metrics = _delta_call(f"merge into the catalog {self.uri}", merger.execute)
            changed = metrics["num_target_rows_inserted"] + metrics["num_target_rows_updated"]
            return table.version() if changed and table.version() != before else None

        return _with_retries(f"append {len(rows)} row(s) to the catalog {self.uri}", merge_once)

    def compact(self, *, min_files: int = 2, retain_hours: int = VACUUM_RETAIN_HOURS) -> Compaction | None:
        """Rewrite the table's data files into one, then vacuum replaced files older than ``retain_hours``.

        None when the table has fewer than ``min_files`` files. Safe beside appenders and readers:
        OPTIMIZE is a commit like any other (a writer it races merges again), and a reader that opened
        the table before it can still read the replaced files for ``retain_hours``.
        """
        table = self._open()
        if table is None:
            return None
        before = len(table.file_uris())
        if before < max(2, min_files):
            return None

        def optimise() -> DeltaTable:
            fresh = self._open()
            assert fresh is not None
            _delta_call(f"compact the catalog {self.uri}", fresh.optimize.compact)
            return fresh

        table = _with_retries(f"compact the catalog {self.uri}", optimise)
        # A reader then replays one checkpoint, not every commit.
        _delta_call(f"checkpoint the catalog {self.uri}", table.create_checkpoint)
        replaced = _delta_call(
            f"vacuum the catalog {self.uri}",
            lambda: table.vacuum(retention_hours=retain_hours, dry_run=False, enforce_retention_duration=False),
        )
        # Files no commit names: what a writer killed inside its commit left. A writer still running
        # has such files too, for seconds, so these go only after ORPHAN_HOURS whatever retain_hours says.
        orphans = _delta_call(
            f"vacuum the catalog {self.uri}",
            lambda: table.vacuum(retention_hours=max(retain_hours, ORPHAN_HOURS), dry_run=False,
                                 enforce_retention_duration=False, full=True),
        )
        return Compaction(before, len(table.file_uris()), len(replaced) + len(orphans))

    def version(self) -> int | None:
        """The table's version: 0 once created, one more per commit; None before the first append."""
        table = self._open()
        return None if table is None else table.version()

    def file_count(self) -> int:
        """Data files in the table's current version (0 before the first append)."""
        table = self._open()
        return 0 if table is None else len(table.file_uris())

    def migrate(self) -> Migration:
        """Move a format 1-3 catalog's parquet parts into the table, then delete the parts.

        Safe to re-run, also after a crash: the merge keeps one row per artifact (ok beats failed,
        as reads of the parts did), and parts are deleted only once every artifact they hold is in
        the table with a status at least as good.
        """
        keys = part_keys(self.store)
        if not keys:
            return Migration(0, 0, 0)
        rows = [CatalogRow.from_record(r) for r in dedup(read_parts(self.store, keys)).to_dict("records")]
        before = self._read(migrating=True)
        self._merge(rows, migrating=True)
        after = self._read(migrating=True).set_index("artifact_id")["status"]
        lost = [r.artifact_id for r in rows if after.get(r.artifact_id) not in (r.status, "ok")]
        if lost:
            raise CatalogError(
                f"migration left {len(lost)} artifact(s) out of {self.uri}, e.g. {lost[0]!r}; the parts are kept"
            )
        for key in keys:
            self.store.delete(key)
        return Migration(len(keys), len(rows), len(after) - len(before))

    # -- reading

    def _read(self, *, migrating: bool = False) -> pd.DataFrame:
        def read_once() -> pd.DataFrame:
            table = self._open(migrating=migrating)
            if table is None:
                return SCHEMA.empty_table().to_pandas()
            try:
                arrow = table.to_pyarrow_table()
            except pa.ArrowException as exc:
                if isinstance(exc, OSError):  # e.g. a file vacuumed since we opened the table: read again
                    raise
                raise CatalogError(
                    f"the catalog {self.uri} holds a data file that is not readable parquet: {str(exc)[:300]}"
                ) from None
            return arrow.select(list(COLUMNS)).cast(SCHEMA).to_pandas()

        frame = _with_retries(f"read the catalog {self.uri}", read_once, retry_on=(DeltaError, OSError), attempts=3)
        return dedup(frame)

    def read(self) -> pd.DataFrame:
        """The whole catalog, one row per artifact_id, oldest first (empty frame if none)."""
        return self._read()

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


def _delta_call(action: str, call: Callable[[], T]) -> T:
    """Run one delta-rs call; its storage and protocol errors become CatalogError naming ``action``.

    CommitFailedError (a lost race) and TableNotFoundError pass through: callers act on them.
    """
    try:
        return call()
    except (CommitFailedError, TableNotFoundError):
        raise
    except (DeltaError, OSError, pa.ArrowException) as exc:
        raise CatalogError(f"cannot {action}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None


def _with_retries(
    action: str,
    call: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...] = (CommitFailedError,),
    attempts: int = COMMIT_ATTEMPTS,
) -> T:
    """``call`` until it stops losing races: jittered exponential backoff, 50 ms to 2 s."""
    for attempt in range(attempts):
        try:
            return call()
        except retry_on as exc:
            if attempt == attempts - 1:
                detail = str(exc).splitlines()[0][:300] if str(exc) else ""
                raise CatalogError(
                    f"cannot {action} after {attempts} attempts: {type(exc).__name__}: {detail}"
                ) from None
            time.sleep(random.uniform(0.5, 1.0) * min(2.0, 0.05 * 2**attempt))
    raise AssertionError("unreachable")
