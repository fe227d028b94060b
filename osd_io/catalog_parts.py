"""Catalogs of osd-fleet 0.1 (formats 1 to 3): immutable parquet parts under ``catalog/parts/``.

Read only, for :meth:`osd_io.catalog.Catalog.migrate`, which moves their rows into the Delta table
and then deletes them. Each part held some rows in the schema of its day:

* format 1: ``rank`` and ``extra_rank`` were int64 (fractional budgets came in 2);
* format 2: no ``higher_is_better`` column (perplexity rows came in 3), so every row measured
  a higher-is-better metric.

A part that is not parquet, lacks columns, or names a newer format is refused with its URI, never
guessed at.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from osd_io.catalog_rows import COLUMNS, SCHEMA, CatalogError
from osd_io.storage import ObjectStore

__all__ = ["FORMAT_KEY", "LAST_PARTS_FORMAT", "PARTS_PREFIX", "part_keys", "read_parts"]

PARTS_PREFIX = "catalog/parts/"
LAST_PARTS_FORMAT = 3
FORMAT_KEY = b"osd_fleet.catalog_format"  # in each part's parquet schema metadata


def part_keys(store: ObjectStore) -> list[str]:
    """The store's catalog parts, oldest first (their keys begin with the UTC time)."""
    return [k for k in store.list(PARTS_PREFIX) if k.endswith(".parquet")]


def _read_part(store: ObjectStore, key: str) -> pa.Table:
    data = store.get_bytes(key, verify=True)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise CatalogError(f"catalog part {store.uri_for(key)} is not a readable parquet file: {exc}") from None
    version = int((table.schema.metadata or {}).get(FORMAT_KEY, b"0"))
    if version > LAST_PARTS_FORMAT:
        raise CatalogError(
            f"catalog part {store.uri_for(key)} has format {version}; parts stopped at format "
            f"{LAST_PARTS_FORMAT}, so it was not written by osd-fleet"
        )
    if "higher_is_better" not in table.column_names:
        table = table.append_column("higher_is_better", pa.array([True] * table.num_rows, pa.bool_()))
    missing = set(COLUMNS) - set(table.column_names)
    if missing:
        raise CatalogError(f"catalog part {store.uri_for(key)} lacks columns {sorted(missing)}")
    return table.select(list(COLUMNS)).cast(SCHEMA)


def read_parts(store: ObjectStore, keys: Sequence[str], *, max_workers: int = 8) -> pd.DataFrame:
    """All rows of ``keys`` in one frame, duplicates kept; ``_part`` numbers each row's part in key order."""
    if not keys:
        return SCHEMA.empty_table().to_pandas().assign(_part=pd.Series(dtype="int64"))
    with ThreadPoolExecutor(max_workers=min(max_workers, len(keys))) as pool:
        tables = list(pool.map(lambda key: _read_part(store, key), keys))
    frames = [table.to_pandas().assign(_part=order) for order, table in enumerate(tables)]
    return pd.concat(frames, ignore_index=True)
