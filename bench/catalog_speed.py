"""Catalog append latency and full-read time, the Delta table against osd-fleet 0.1's parquet parts.

    python bench/catalog_speed.py [--rows 100,2000] [--appends 10] [--repeats 3] [--backends local,s3]

For each backend (a local directory; moto's S3 server on 127.0.0.1 over HTTP) and each size N, a
fresh catalog of each kind is brought to N rows in one write, as a compacted catalog holds them;
then ``--appends`` single-row appends are timed one by one (the flow appends one row per variant),
and the full read that answers a query (``Catalog.read``: one row per artifact) is timed with
those appends in place. The parts are written and read as 0.1 did: one parquet object per append
with a conditional PUT, read back by listing, fetching every part and deduplicating.
Prints one table, Delta's time over the parts' as a ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

import pandas as pd
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osd_io.catalog import Catalog  # noqa: E402
from osd_io.catalog_parts import FORMAT_KEY, PARTS_PREFIX, part_keys, read_parts  # noqa: E402
from osd_io.catalog_rows import CatalogRow, dedup, rows_to_table  # noqa: E402
from osd_io.storage import ObjectStore, open_store  # noqa: E402


def row(number: int) -> CatalogRow:
    return CatalogRow(
        model=f"model-{number % 20}", revision="v1", base="base", method="magtruncsvd", rank=1 + number % 4,
        extra_rank=3, allocation="uniform", budget_bits=10**6, paper_bits=10**6, bytes=2 * 10**5 + number,
        accuracy=0.9, metric="accuracy", eval_data="e" * 64, uri=f"s3://bench/a{number}", sha256="f" * 64,
        artifact_id=f"a{number}", created=dt.datetime(2026, 12, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=number),
    )


class Parts:
    """osd-fleet 0.1's catalog, as far as appending and reading go."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def append(self, rows: Sequence[CatalogRow]) -> None:
        sink = io.BytesIO()
        pq.write_table(rows_to_table(rows).replace_schema_metadata({FORMAT_KEY: b"3"}), sink)
        key = f"{PARTS_PREFIX}{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex}.parquet"
        self.store.put_bytes(key, sink.getvalue(), if_absent=True)

    def read(self) -> pd.DataFrame:
        return dedup(read_parts(self.store, part_keys(self.store)))


def timings(call: Callable[[], object], times: int) -> list[float]:
    out = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def measure(kind: type, store: ObjectStore, rows: int, appends: int, repeats: int) -> tuple[float, float]:
    """(median seconds per single-row append, median seconds per full read) at ``rows`` rows."""
    catalog = kind(store)
    catalog.append([row(n) for n in range(rows)])
    extra = iter(range(rows, rows + appends))
    append_s = timings(lambda: catalog.append([row(next(extra))]), appends)
    read_s = timings(lambda: catalog.read(), repeats)
    assert len(catalog.read()) == rows + appends
    return statistics.median(append_s), statistics.median(read_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="100,2000")
    parser.add_argument("--appends", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="local,s3")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    print("| backend | rows | append, parts | append, Delta | Delta / parts | read, parts | read, Delta | "
          "Delta / parts |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    try:
        with TemporaryDirectory() as scratch:
            for backend in args.backends.split(","):
                for rows in sizes:
                    results = {}
                    for kind in (Parts, Catalog):
                        name = f"{kind.__name__}-{rows}"
                        uri = f"{scratch}/{name}" if backend == "local" else f"s3://{bucket}/{name}"
                        results[kind] = measure(kind, open_store(uri), rows, args.appends, args.repeats)
                    (pa_, pr), (da, dr) = results[Parts], results[Catalog]
                    print(f"| {backend} | {rows:,} | {pa_ * 1e3:.0f} ms | {da * 1e3:.0f} ms | {da / pa_:.1f} | "
                          f"{pr * 1e3:.0f} ms | {dr * 1e3:.0f} ms | {dr / pr:.2f} |", flush=True)
    finally:
        server.stop()
    print(f"medians of {args.appends} single-row appends and {args.repeats} reads, each catalog holding the "
          f"rows in one write plus the {args.appends} appends")


if __name__ == "__main__":
    main()
