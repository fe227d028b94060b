"""The catalog on both backends: schema round trip, one row per artifact, queries, compaction,
migration from parquet parts, concurrent appenders, and reads by tools other than osd-fleet."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltalake import DeltaTable, write_deltalake

from osd_io.catalog import CATALOG_FORMAT, TABLE_KEY, Catalog, CatalogError, CatalogRow, Migration, NoneMeetsError
from osd_io.catalog_parts import PARTS_PREFIX
from osd_io.catalog_rows import COLUMNS, SCHEMA, rows_to_table
from osd_io.keys import InvalidNameError
from osd_io.storage import ObjectStore, open_store

pytest_plugins = ["tests.s3_server"]

T0 = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


def make_row(**overrides: Any) -> CatalogRow:
    values: dict[str, Any] = dict(
        model="tiny-llama", revision="v1", base="tiny-base", method="osd", rank=8, extra_rank=2,
        allocation="uniform", budget_bits=1_000_000, paper_bits=1_200_000, bytes=2_100_000,
        accuracy=0.93, metric="accuracy", eval_data="e" * 64, uri="s3://b/p/a1", sha256="f" * 64,
        artifact_id="a1", osd_fleet_version="0.1.0", created=T0, status="ok",
        params={"seed": 0, "layers": ["q", "v"]},
    )
    values.update(overrides)
    return CatalogRow(**values)


# --------------------------------------------------------------------------- schema


def test_schema_is_derived_from_the_dataclass() -> None:
    assert COLUMNS == tuple(f.name for f in dataclasses.fields(CatalogRow))
    assert SCHEMA.field("bytes").type == pa.int64()
    assert SCHEMA.field("budget_bits").type == pa.int64()
    assert SCHEMA.field("accuracy").type == pa.float64() and SCHEMA.field("accuracy").nullable
    assert SCHEMA.field("created").type == pa.timestamp("us", tz="UTC")
    assert not SCHEMA.field("model").nullable


@pytest.mark.parametrize("accuracy", [0.93, None])
def test_row_parquet_dataframe_row_round_trip(accuracy: float | None) -> None:
    row = make_row(accuracy=accuracy)
    buf = io.BytesIO()
    pq.write_table(rows_to_table([row]), buf)
    df = pd.read_parquet(io.BytesIO(buf.getvalue()))
    assert list(df.columns) == list(COLUMNS)
    back = CatalogRow.from_record(df.to_dict("records")[0])
    assert back == row
    assert back.params_dict == {"seed": 0, "layers": ["q", "v"]}


def test_created_is_normalised_to_utc() -> None:
    tz = dt.timezone(dt.timedelta(hours=2))
    row = make_row(created=dt.datetime(2026, 1, 1, 14, 0, tzinfo=tz))
    assert row.created == dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert row.created.utcoffset() == dt.timedelta(0)
    assert make_row(created=pd.Timestamp("2026-01-01T12:00Z")).created == row.created


def test_defaults() -> None:
    values = dataclasses.asdict(make_row())
    for name in ("accuracy", "osd_fleet_version", "created", "status", "params"):
        del values[name]
    row = CatalogRow(**values)
    assert (row.accuracy, row.status, row.params) == (None, "ok", "{}")
    assert row.created.tzinfo is dt.UTC and row.osd_fleet_version


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"rank": -1}, ValueError, r"rank must be a number >= 0, got -1"),
        ({"extra_rank": True}, ValueError, r"extra_rank must be a number >= 0, got True"),
        ({"bytes": 1.5}, ValueError, r"bytes must be an int >= 0, got 1.5"),
        ({"metric": None}, ValueError, r"metric must be a str, got NoneType"),
        ({"status": "done"}, ValueError, r"status must be one of \('ok', 'failed'\), got 'done'"),
        ({"accuracy": float("nan")}, ValueError, r"accuracy must be finite"),
        ({"accuracy": "0.9"}, ValueError, r"accuracy must be a float or None"),
        ({"created": dt.datetime(2026, 1, 1)}, ValueError, r"created must be a timezone-aware"),
        ({"params": "[1, 2]"}, ValueError, r"params must be a JSON object"),
        ({"params": "{not json"}, ValueError, r"params must be a JSON object"),
        ({"artifact_id": ""}, ValueError, r"artifact_id must not be empty"),
        ({"model": "../etc"}, InvalidNameError, r"'\.\./etc'"),
        ({"revision": "a b"}, InvalidNameError, r"'a b'"),
    ],
)
def test_row_validation(overrides: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make_row(**overrides)


# --------------------------------------------------------------------------- catalog, both backends


def outside_reader(store: ObjectStore) -> DeltaTable:
    """The table as a tool without osd-fleet opens it: deltalake and the store's location only."""
    location = store.table_location(TABLE_KEY)
    return DeltaTable(location.uri, storage_options=location.storage_options)


def test_empty_catalog_read(store: ObjectStore) -> None:
    catalog = Catalog(store)
    df = catalog.read()
    assert df.empty and list(df.columns) == list(COLUMNS)
    assert catalog.rows() == [] and catalog.file_count() == 0
    assert catalog.compact() is None
    assert store.list("") == []  # reading creates nothing
    catalog.append([make_row()])
    assert catalog.read().dtypes.to_dict() == df.dtypes.to_dict()  # same dtypes empty or not


def test_append_and_read_round_trip(store: ObjectStore) -> None:
    catalog = Catalog(store)
    rows = [make_row(artifact_id=f"a{i}", created=T0 + dt.timedelta(minutes=i), accuracy=None if i == 1 else 0.9)
            for i in range(3)]
    version = catalog.append(rows)
    assert version == outside_reader(store).version() and store.list(f"{TABLE_KEY}/_delta_log/")
    assert catalog.append([]) is None
    df = catalog.read()
    assert list(df["artifact_id"]) == ["a0", "a1", "a2"]
    assert df["accuracy"].isna().tolist() == [False, True, False]
    assert catalog.rows() == rows


def test_one_row_per_artifact_in_the_table_itself(store: ObjectStore) -> None:
    catalog = Catalog(store)
    first = make_row(artifact_id="a1", created=T0)
    catalog.append([first])
    version = outside_reader(store).version()
    assert catalog.append([make_row(artifact_id="a1", created=T0 + dt.timedelta(hours=1), bytes=5)]) is None  # rerun
    assert outside_reader(store).version() == version  # nothing committed
    catalog.append([make_row(artifact_id="a2"), make_row(artifact_id="a2")])  # twice in one append
    assert catalog.rows() == [first, make_row(artifact_id="a2")]
    outside = outside_reader(store).to_pandas()  # what pandas, DuckDB or Spark see: no duplicates
    assert sorted(outside["artifact_id"]) == ["a1", "a2"] and outside.loc[outside.artifact_id == "a1", "bytes"].item() \
        == first.bytes


def test_ok_replaces_failed_and_nothing_replaces_ok(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append([make_row(artifact_id="x", status="failed", accuracy=None, created=T0)])
    ok = make_row(artifact_id="x", status="ok", created=T0 + dt.timedelta(minutes=5))
    assert catalog.append([ok]) is not None
    assert catalog.append([make_row(artifact_id="x", status="failed", created=T0 + dt.timedelta(minutes=9))]) is None
    assert catalog.rows() == [ok]
    assert outside_reader(store).to_pandas()["status"].tolist() == ["ok"]


def test_rows_by_model(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append([make_row(model="m1", artifact_id="1"), make_row(model="m2", artifact_id="2")])
    assert [r.artifact_id for r in catalog.rows("m2")] == ["2"]
    assert catalog.rows("m3") == []
    assert len(catalog.rows()) == 2


def test_smallest(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append([
        make_row(artifact_id="big", bytes=9_000_000, accuracy=0.97),
        make_row(artifact_id="mid", bytes=4_000_000, accuracy=0.955),
        make_row(artifact_id="mid-better", bytes=4_000_000, accuracy=0.96),
        make_row(artifact_id="small", bytes=1_000_000, accuracy=0.90),
        make_row(artifact_id="failed", bytes=10, accuracy=None, status="failed"),
        make_row(model="other", artifact_id="o", bytes=1, accuracy=0.99),
    ])
    assert catalog.smallest("tiny-llama", 0.95).artifact_id == "mid-better"  # size tie: accuracy
    assert catalog.smallest("tiny-llama", 0.5).artifact_id == "small"
    assert catalog.smallest("tiny-llama", 0.97).artifact_id == "big"
    with pytest.raises(NoneMeetsError, match=r"^none of 4 artifacts of model 'tiny-llama' meets "
                                               r"accuracy >= 0\.98; best is 0\.97 at 9 MB$"):
        catalog.smallest("tiny-llama", 0.98)


def test_none_meets_messages(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append([make_row(artifact_id=f"a{i}", bytes=b, accuracy=acc)
                    for i, (b, acc) in enumerate([(2_100_000, 0.93), (5_000_000, 0.93), (900, 0.5), (3, 0.1)])])
    with pytest.raises(NoneMeetsError, match=r"^none of 4 artifacts of model 'tiny-llama' meets "
                                               r"accuracy >= 0\.95; best is 0\.93 at 2\.1 MB$") as err:
        catalog.smallest("tiny-llama", 0.95)
    assert isinstance(err.value, LookupError) and isinstance(err.value, CatalogError)
    with pytest.raises(NoneMeetsError, match=r"^no successful artifacts of model 'nobody' in the catalog$"):
        catalog.smallest("nobody", 0.1)
    catalog.append([make_row(model="m", artifact_id="u", accuracy=None)])
    with pytest.raises(NoneMeetsError, match=r"none of 1 artifacts of model 'm' .*none has a measured"):
        catalog.smallest("m", 0.1)
    catalog.append([make_row(model="f", artifact_id="f", status="failed")])
    with pytest.raises(NoneMeetsError, match=r"no successful artifacts of model 'f' .*\(1 failed\)"):
        catalog.smallest("f", 0.1)


def test_compact_rewrites_files_into_one_and_vacuums_the_old(store: ObjectStore) -> None:
    catalog = Catalog(store)
    for i in range(4):
        catalog.append([make_row(artifact_id=f"a{i}", created=T0 + dt.timedelta(minutes=i))])
    before = catalog.read()
    data_files = lambda: [k for k in store.list(f"{TABLE_KEY}/") if k.endswith(".parquet") and "/_delta_log/" not in k]  # noqa: E731
    assert catalog.file_count() == 4 and len(data_files()) == 4
    kept = catalog.compact()  # the default retention keeps replaced files for readers already in
    assert kept is not None and (kept.files_before, kept.files_after, kept.vacuumed) == (4, 1, 0)
    assert len(data_files()) == 5
    pd.testing.assert_frame_equal(catalog.read(), before)
    catalog.append([make_row(artifact_id="late")])
    assert catalog.compact(retain_hours=0).vacuumed == 6  # the four first, the first compaction's, the late one
    assert len(data_files()) == 1 and len(catalog.read()) == 5
    assert outside_reader(store).to_pandas().shape[0] == 5


def test_a_data_file_no_commit_names_is_ignored_then_vacuumed_when_old(tmp_path: Path) -> None:
    """What a writer killed inside a Delta commit leaves: data written, log entry never created.

    Local only: the test ages the file with ``os.utime``, which S3 has no way to do.
    """
    store = open_store(str(tmp_path))
    catalog = Catalog(store)
    catalog.append([make_row(artifact_id="a0")])
    catalog.append([make_row(artifact_id="a1")])
    fresh, old = (f"{TABLE_KEY}/part-00000-{name}-c000.snappy.parquet" for name in ("fresh", "old"))
    for key in (fresh, old):
        store.put_bytes(key, _part_bytes(rows_to_table([make_row(artifact_id=f"ghost-{key}")]), b"3"))
    two_hours_ago = time.time() - 2 * 3600
    os.utime(tmp_path / old, (two_hours_ago, two_hours_ago))
    assert sorted(catalog.read()["artifact_id"]) == ["a0", "a1"] and catalog.file_count() == 2
    done = catalog.compact(retain_hours=0)  # the two replaced files, and the old orphan
    assert done.vacuumed == 3 and not store.exists(old)
    assert store.exists(fresh)  # it may be a running writer's: kept whatever the retention
    assert sorted(catalog.read()["artifact_id"]) == ["a0", "a1"]


def test_compaction_waits_for_its_threshold(store: ObjectStore) -> None:
    catalog = Catalog(store)
    for i in range(3):
        catalog.append([make_row(artifact_id=f"a{i}")])
    assert catalog.compact(min_files=4) is None and catalog.file_count() == 3
    catalog.append([make_row(artifact_id="a3")])
    assert catalog.compact(min_files=4) is not None and catalog.file_count() == 1
    assert sorted(catalog.read()["artifact_id"]) == ["a0", "a1", "a2", "a3"]


def test_newer_format_and_foreign_tables_are_refused(store: ObjectStore) -> None:
    location = store.table_location(TABLE_KEY)
    DeltaTable.create(location.uri, SCHEMA, configuration={"osd_fleet.catalog_format": "99"},
                      storage_options=location.storage_options, raise_if_key_not_exists=False)
    with pytest.raises(CatalogError, match=f"has format 99; this osd-fleet reads up to {CATALOG_FORMAT}: upgrade"):
        Catalog(store).read()
    with pytest.raises(CatalogError, match="has format 99"):
        Catalog(store).append([make_row()])


def test_a_delta_table_that_is_not_a_catalog_is_refused(store: ObjectStore) -> None:
    location = store.table_location(TABLE_KEY)
    write_deltalake(location.uri, pa.table({"x": [1]}), storage_options=location.storage_options)
    with pytest.raises(CatalogError, match="is a Delta table but not an osd-fleet catalog"):
        Catalog(store).rows()


def test_fractional_budgets_round_trip_and_whole_ones_read_back_as_ints(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append([make_row(artifact_id="half", rank=0.5, extra_rank=1.5), make_row(artifact_id="one", rank=1.0)])
    rows = {row.artifact_id: row for row in catalog.rows("tiny-llama")}
    assert (rows["half"].rank, rows["half"].extra_rank) == (0.5, 1.5)
    assert rows["one"].rank == 1 and isinstance(rows["one"].rank, int)
    assert catalog.read().query("rank < 1")["artifact_id"].tolist() == ["half"]


def test_other_tools_read_the_table_without_osd_fleet(tmp_path: Any) -> None:
    import duckdb

    catalog = Catalog(open_store(str(tmp_path)))
    catalog.append([make_row(artifact_id="a", bytes=300), make_row(artifact_id="b", bytes=100, accuracy=0.95)])
    frame = DeltaTable(str(tmp_path / "catalog")).to_pandas()  # as the README shows, no osd-fleet import
    assert sorted(frame["artifact_id"]) == ["a", "b"]
    dataset = DeltaTable(str(tmp_path / "catalog")).to_pyarrow_dataset()  # noqa: F841 - DuckDB scans it by name
    smallest = duckdb.sql(
        "SELECT artifact_id, bytes FROM dataset WHERE model = 'tiny-llama' AND accuracy >= 0.91 ORDER BY bytes LIMIT 1"
    ).fetchall()
    assert smallest == [("b", 100)] and catalog.smallest("tiny-llama", 0.91).artifact_id == "b"


# --------------------------------------------------------------------------- migration from parquet parts


def _part_bytes(table: pa.Table, version: bytes) -> bytes:
    """A part as osd-fleet 0.1 wrote it: one parquet file with its format in the schema metadata."""
    sink = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({b"osd_fleet.catalog_format": version}), sink)
    return sink.getvalue()


def put_part(store: ObjectStore, name: str, table: pa.Table, version: bytes = b"3") -> str:
    key = f"{PARTS_PREFIX}{name}.parquet"
    store.put_bytes(key, _part_bytes(table, version))
    return key


def test_parts_must_be_migrated_before_use(store: ObjectStore) -> None:
    put_part(store, "20260101T000000000000Z-a", rows_to_table([make_row()]))
    catalog = Catalog(store)
    for use in (catalog.read, lambda: catalog.append([make_row(artifact_id="b")]), catalog.compact):
        with pytest.raises(CatalogError, match="parquet-parts layout .* osd-fleet catalog migrate --store"):
            use()
    assert catalog.migrate().parts == 1 and catalog.rows() == [make_row()]


def test_migration_loses_nothing_and_is_safe_to_rerun(store: ObjectStore) -> None:
    old_schema = pa.schema([pa.field(f.name, pa.int64(), f.nullable) if f.name in ("rank", "extra_rank") else f
                            for f in SCHEMA])
    format_1 = pa.Table.from_pylist([make_row(artifact_id="old", created=T0).to_record()], schema=old_schema)
    format_2 = rows_to_table([make_row(artifact_id="v2", created=T0)]).drop_columns(["higher_is_better"])
    failed = make_row(artifact_id="retried", status="failed", accuracy=None, created=T0)
    ok = make_row(artifact_id="retried", rank=0.25, created=T0 + dt.timedelta(minutes=1))
    first = put_part(store, "20260101T000000000000Z-a", format_1, b"1")
    put_part(store, "20260101T000001000000Z-b", format_2, b"2")
    put_part(store, "20260101T000002000000Z-c", rows_to_table([failed, make_row(artifact_id="old")]))
    put_part(store, "20260101T000003000000Z-d", rows_to_table([ok]))
    catalog = Catalog(store)
    done = catalog.migrate()
    assert (done.parts, done.rows, done.added) == (4, 3, 3) and store.list(PARTS_PREFIX) == []
    rows = {row.artifact_id: row for row in catalog.rows()}
    assert rows["old"].rank == 8 and rows["v2"].higher_is_better and rows["retried"] == ok
    assert catalog.migrate().parts == 0  # nothing left: a no-op
    before, version = catalog.read(), outside_reader(store).version()
    store.put_bytes(first, _part_bytes(format_1, b"1"))  # as a migration that crashed before deleting leaves it
    assert catalog.migrate() == Migration(parts=1, rows=1, added=0) and outside_reader(store).version() == version
    pd.testing.assert_frame_equal(catalog.read(), before)


def test_migration_keeps_rows_already_in_the_table(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append([make_row(artifact_id="new")])
    later = make_row(artifact_id="new", bytes=1, created=T0 + dt.timedelta(days=1))
    put_part(store, "20260101T000000000000Z-a", rows_to_table([make_row(artifact_id="old"), later]))
    assert catalog.migrate() == Migration(parts=1, rows=2, added=1)
    rows = {row.artifact_id: row for row in catalog.rows()}
    assert rows["new"] == make_row(artifact_id="new") and rows["old"] == make_row(artifact_id="old")


def test_a_bad_part_stops_the_migration_and_is_kept(store: ObjectStore) -> None:
    good = put_part(store, "20260101T000000000000Z-a", rows_to_table([make_row()]))
    bad = f"{PARTS_PREFIX}20260101T000001000000Z-b.parquet"
    store.put_bytes(bad, b"not parquet")
    future = put_part(store, "20260101T000002000000Z-c", rows_to_table([make_row(artifact_id="f")]), b"99")
    with pytest.raises(CatalogError, match=f"catalog part {store.uri_for(bad)} is not a readable parquet file"):
        Catalog(store).migrate()
    assert store.list(PARTS_PREFIX) == [good, bad, future] and not store.list(f"{TABLE_KEY}/_delta_log/")
    store.delete(bad)
    with pytest.raises(CatalogError, match="has format 99; parts stopped at format 3"):
        Catalog(store).migrate()
    assert store.list(PARTS_PREFIX) == [good, future]


def test_catalog_migrate_and_compact_commands(store_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    from osd_cli.main import main

    store = open_store(store_uri)
    put_part(store, "20260101T000000000000Z-a", rows_to_table([make_row(artifact_id="a0"), make_row(artifact_id="a1")]))
    assert main(["catalog", "list", "--store", store_uri]) == 2
    assert "osd-fleet catalog migrate" in capsys.readouterr().err
    assert main(["catalog", "migrate", "--store", store_uri]) == 0
    assert "migrated 1 part(s), 2 distinct row(s) (2 new)" in capsys.readouterr().out
    assert main(["catalog", "migrate", "--store", store_uri]) == 0
    assert "nothing to migrate" in capsys.readouterr().out
    catalog = Catalog(store)
    for i in range(2, 4):
        catalog.append([make_row(artifact_id=f"a{i}")])
    assert main(["catalog", "compact", "--store", store_uri, "--retain-hours", "0"]) == 0
    assert "3 files into 1, 3 old file(s) vacuumed" in capsys.readouterr().out
    assert catalog.file_count() == 1 and len(catalog.read()) == 4
    assert main(["catalog", "compact", "--store", store_uri]) == 0
    assert "nothing to compact (1 file(s))" in capsys.readouterr().out


def test_perplexity_rows_take_a_ceiling_and_a_wrong_direction_is_refused(store: ObjectStore) -> None:
    catalog = Catalog(store)
    lm = {"model": "lm", "metric": "perplexity", "higher_is_better": False}
    catalog.append([make_row(artifact_id="small", bytes=100, accuracy=14.0, **lm),
                    make_row(artifact_id="big", bytes=900, accuracy=11.5, **lm)])
    assert catalog.smallest("lm", at_most=12.0).artifact_id == "big"
    assert catalog.smallest("lm", at_most=20.0).artifact_id == "small"
    with pytest.raises(NoneMeetsError, match=r"meets perplexity <= 11; best is 11\.5 at 900 B$"):
        catalog.smallest("lm", at_most=11.0)
    with pytest.raises(CatalogError, match="perplexity of model 'lm' is lower-is-better: ask for a ceiling"):
        catalog.smallest("lm", 0.9)
    catalog.append([make_row()])
    with pytest.raises(CatalogError, match="accuracy of model 'tiny-llama' is higher-is-better: ask for a floor"):
        catalog.smallest("tiny-llama", at_most=0.5)
    with pytest.raises(CatalogError, match="exactly one bound"):
        catalog.smallest("lm")


# --------------------------------------------------------------------------- concurrency

WRITERS, ROWS_EACH = 8, 4


def _append_rows(uri: str, writer: int, barrier: Any) -> None:
    """One writer: separate appends of one row each, all writers released together; every row twice."""
    catalog = Catalog(open_store(uri))
    barrier.wait(timeout=120)
    for i in range(ROWS_EACH):
        row = make_row(artifact_id=f"w{writer % (WRITERS // 2)}-r{i}", created=dt.datetime.now(dt.UTC))
        catalog.append([row])  # writers w and w + 4 race to add the same artifact


def _check_all_rows(store: ObjectStore) -> None:
    df = Catalog(store).read()
    expected = {f"w{w}-r{i}" for w in range(WRITERS // 2) for i in range(ROWS_EACH)}
    assert set(df["artifact_id"]) == expected  # no lost rows
    outside = outside_reader(store).to_pandas()
    assert len(outside) == len(expected) and outside["artifact_id"].is_unique  # none twice, even in the raw table


def test_concurrent_appenders_threads(store: ObjectStore, store_uri: str) -> None:
    barrier = threading.Barrier(WRITERS)
    errors: list[BaseException] = []

    def run(w: int) -> None:
        try:
            _append_rows(store_uri, w, barrier)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    _check_all_rows(store)


def test_concurrent_appenders_processes(s3_server: str) -> None:
    uri = f"{s3_server}/procs"
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as Ray workers would be
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_append_rows, args=(uri, w, barrier)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    _check_all_rows(open_store(uri))
