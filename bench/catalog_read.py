"""What a catalog read costs as runs append to it, before and after compaction, on S3 over HTTP.

    python bench/catalog_read.py [--rows 2000] [--repeats 3]

Appends ``--rows`` rows to a fresh catalog on moto's S3 server (127.0.0.1), one part per row as
the flow writes them, and times ``Catalog.read()``; then compacts (``Catalog.compact``, what the
flow does past ``COMPACT_AFTER_PARTS`` parts) and times the read again. Prints both and their ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from osd_io.catalog import COMPACT_AFTER_PARTS, Catalog, CatalogRow  # noqa: E402
from osd_io.storage import open_store  # noqa: E402


def row(number: int) -> CatalogRow:
    return CatalogRow(
        model=f"model-{number % 20}", revision="v1", base="base", method="magtruncsvd", rank=1 + number % 4,
        extra_rank=3, allocation="uniform", budget_bits=10**6, paper_bits=10**6, bytes=2 * 10**5 + number,
        accuracy=0.9, metric="accuracy", eval_data="e" * 64, uri=f"s3://bench/a{number}", sha256="f" * 64,
        artifact_id=f"a{number}", created=dt.datetime(2026, 12, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=number),
    )


def timed_read(catalog: Catalog, repeats: int) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        rows = len(catalog.read())
        times.append(time.perf_counter() - started)
    return statistics.median(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    try:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        catalog = Catalog(open_store(f"s3://{bucket}/fleet"))
        started = time.perf_counter()
        for number in range(args.rows):
            catalog.append([row(number)])
        append_s = time.perf_counter() - started
        parts = catalog.part_count()
        before, rows = timed_read(catalog, args.repeats)
        started = time.perf_counter()
        catalog.compact()
        compact_s = time.perf_counter() - started
        after, rows_after = timed_read(catalog, args.repeats)
        parts_after = catalog.part_count()
    finally:
        server.stop()
    assert rows == rows_after == args.rows, (rows, rows_after)
    print(f"{args.rows} rows appended one part each in {append_s:.1f} s; "
          f"the flow compacts past {COMPACT_AFTER_PARTS} parts")
    print(f"| catalog | parts | read (median of {args.repeats}) |")
    print("|---|---:|---:|")
    print(f"| before compaction | {parts} | {before:.2f} s |")
    print(f"| after compaction ({compact_s:.1f} s) | {parts_after} | {after:.3f} s |")
    print(f"read after / before: {after / before:.3f}")


if __name__ == "__main__":
    main()
