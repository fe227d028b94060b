"""The catalog on both backends: schema round trip, dedup, queries, concurrent appenders."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import multiprocessing
import threading
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from osd_io.catalog import (
    COLUMNS,
    PARTS_PREFIX,
    SCHEMA,
    Catalog,
    CatalogError,
    CatalogRow,
    NoneMeetsError,
    rows_to_table,
)
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
    assert SCHEMA.metadata[b"osd_fleet.catalog_format"] == b"3"


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


def test_empty_catalog_read(store: ObjectStore) -> None:
    catalog = Catalog(store)
    df = catalog.read()
    assert df.empty and list(df.columns) == list(COLUMNS)
    assert catalog.rows() == []
    assert catalog.compact() is None
    catalog.append([make_row()])
    assert catalog.read().dtypes.to_dict() == df.dtypes.to_dict()  # same dtypes empty or not


def test_append_and_read_round_trip(store: ObjectStore) -> None:
    catalog = Catalog(store)
    rows = [make_row(artifact_id=f"a{i}", created=T0 + dt.timedelta(minutes=i), accuracy=None if i == 1 else 0.9)
            for i in range(3)]
    key = catalog.append(rows)
    assert key is not None and key.startswith(PARTS_PREFIX) and key.endswith(".parquet")
    assert store.list(PARTS_PREFIX) == [key]
    assert catalog.append([]) is None
    df = catalog.read()
    assert list(df["artifact_id"]) == ["a0", "a1", "a2"]
    assert df["accuracy"].isna().tolist() == [False, True, False]
    assert catalog.rows() == rows


def test_dedup_by_artifact_id(store: ObjectStore) -> None:
    catalog = Catalog(store)
    first = make_row(artifact_id="a1", created=T0)
    catalog.append([first])
    catalog.append([make_row(artifact_id="a1", created=T0 + dt.timedelta(hours=1), bytes=5)])  # rerun
    catalog.append([make_row(artifact_id="a2"), make_row(artifact_id="a2")])  # twice in one append
    assert len(store.list(PARTS_PREFIX)) == 3
    assert catalog.rows() == [first, make_row(artifact_id="a2")]


def test_dedup_prefers_ok_over_failed(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append([make_row(artifact_id="x", status="failed", accuracy=None, created=T0)])
    ok = make_row(artifact_id="x", status="ok", created=T0 + dt.timedelta(minutes=5))
    catalog.append([ok])
    catalog.append([make_row(artifact_id="x", status="failed", created=T0 + dt.timedelta(minutes=9))])
    assert catalog.rows() == [ok]


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


def test_compact(store: ObjectStore) -> None:
    catalog = Catalog(store)
    for i in range(4):
        catalog.append([make_row(artifact_id=f"a{i % 3}", created=T0 + dt.timedelta(minutes=i))])
    before = catalog.read()
    merged = catalog.compact()
    assert store.list(PARTS_PREFIX) == [merged]
    pd.testing.assert_frame_equal(catalog.read(), before)
    catalog.append([make_row(artifact_id="late")])
    assert len(catalog.read()) == 4


def test_compaction_waits_for_its_threshold(store: ObjectStore) -> None:
    catalog = Catalog(store)
    for i in range(3):
        catalog.append([make_row(artifact_id=f"a{i}")])
    assert catalog.compact(min_parts=4) is None and catalog.part_count() == 3
    catalog.append([make_row(artifact_id="a3")])
    assert catalog.compact(min_parts=4) is not None and catalog.part_count() == 1
    assert sorted(catalog.read()["artifact_id"]) == ["a0", "a1", "a2", "a3"]


def test_newer_format_refused(store: ObjectStore) -> None:
    table = rows_to_table([make_row()]).replace_schema_metadata({b"osd_fleet.catalog_format": b"99"})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    store.put_bytes(f"{PARTS_PREFIX}future.parquet", sink.getvalue())
    with pytest.raises(CatalogError, match="has format 99; .* reads up to 3"):
        Catalog(store).read()


def test_fractional_budgets_round_trip_and_whole_ones_read_back_as_ints(store: ObjectStore) -> None:
    catalog = Catalog(store)
    catalog.append([make_row(artifact_id="half", rank=0.5, extra_rank=1.5), make_row(artifact_id="one", rank=1.0)])
    rows = {row.artifact_id: row for row in catalog.rows("tiny-llama")}
    assert (rows["half"].rank, rows["half"].extra_rank) == (0.5, 1.5)
    assert rows["one"].rank == 1 and isinstance(rows["one"].rank, int)
    assert catalog.read().query("rank < 1")["artifact_id"].tolist() == ["half"]


def test_format_1_parts_with_integer_ranks_are_still_read(store: ObjectStore) -> None:
    old_schema = pa.schema([pa.field(f.name, pa.int64(), f.nullable) if f.name in ("rank", "extra_rank") else f
                            for f in SCHEMA], metadata={b"osd_fleet.catalog_format": b"1"})
    table = pa.Table.from_pylist([make_row(artifact_id="old").to_record()], schema=old_schema)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    store.put_bytes(f"{PARTS_PREFIX}old.parquet", sink.getvalue())
    Catalog(store).append([make_row(artifact_id="new", rank=0.25)])
    ranks = {row.artifact_id: row.rank for row in Catalog(store).rows("tiny-llama")}
    assert ranks == {"old": 8, "new": 0.25}


# --------------------------------------------------------------------------- concurrency

WRITERS, ROWS_EACH = 8, 25


def _append_rows(uri: str, writer: int, barrier: Any) -> None:
    """One writer: 25 separate appends of one row each, all writers released together."""
    catalog = Catalog(open_store(uri))
    barrier.wait(timeout=120)
    for i in range(ROWS_EACH):
        catalog.append([make_row(artifact_id=f"w{writer}-r{i}", created=dt.datetime.now(dt.UTC))])


def _check_all_rows(store: ObjectStore) -> None:
    df = Catalog(store).read()
    expected = {f"w{w}-r{i}" for w in range(WRITERS) for i in range(ROWS_EACH)}
    assert len(df) == WRITERS * ROWS_EACH  # no lost rows
    assert set(df["artifact_id"]) == expected and df["artifact_id"].is_unique  # no duplicates
    assert len(store.list(PARTS_PREFIX)) == WRITERS * ROWS_EACH  # one part per append


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


def test_catalog_compact_command(store_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    from osd_cli.main import main

    catalog = Catalog(open_store(store_uri))
    for i in range(3):
        catalog.append([make_row(artifact_id=f"a{i}")])
    assert main(["catalog", "compact", "--store", store_uri]) == 0
    assert "merged 3 parts into catalog/parts/" in capsys.readouterr().out
    assert catalog.part_count() == 1 and len(catalog.read()) == 3
    assert main(["catalog", "compact", "--store", store_uri]) == 0
    assert "nothing to merge (1 part(s))" in capsys.readouterr().out


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


def test_format_2_parts_read_as_higher_is_better(store: ObjectStore) -> None:
    table = rows_to_table([make_row()]).drop_columns(["higher_is_better"])
    table = table.replace_schema_metadata({b"osd_fleet.catalog_format": b"2"})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    store.put_bytes(f"{PARTS_PREFIX}old.parquet", sink.getvalue())
    (row,) = Catalog(store).rows()
    assert row.higher_is_better and row.metric == "accuracy" and Catalog(store).smallest("tiny-llama", 0.9) == row
