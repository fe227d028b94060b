"""Faults the fleet pipeline must survive, injected into real parts: Ray, Prefect, the store, S3.

Every test records its runs in the reliability table (``tests.reliability``, ``make reliability``):

* A Ray worker process SIGKILLed while it runs a compress task, in repeated runs at different
  moments: Ray retries the task (``workers.tasks`` declares its retries for a dead worker) and
  every run's artifacts are byte-identical to an undisturbed run's.
* The flow's process SIGKILLed between writing artifacts and publishing their catalog rows
  (``tests.killed_flow``): no row points at a missing or partial delta, and a rerun finishes the
  work without a duplicate row.
* The S3 server stopped mid-run. A short outage is ridden out by the retries; a long one ends
  the run with one clear error after bounded retries with backoff, damages nothing already
  stored, and the next run resumes and finishes. moto keeps its objects in this process while
  its endpoint is down (``tests.s3_server``), as a real server keeps them on disk; a server that
  loses or tears objects in its own crash is not simulated: S3's atomic PUT is assumed.
* Rerunning a finished run changes no object and adds no row (the reruns after the faults).
* Eight flow runs at once appending to one catalog on S3 while a reader keeps reading it: no
  lost rows, no duplicates, never a partial row. The runs are threads of one process sharing
  its Ray and Prefect API (separate processes append concurrently in ``test_catalog``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from flows.fleet_config import ModelSpec, SweepSpec
from osd_cli.main import main
from osd_core.artifact import DeltaArtifact
from osd_io.artifacts import download_delta
from osd_io.catalog import Catalog, CatalogRow
from osd_io.storage import EndpointUnreachableError, ObjectStore, open_store
from tests.conftest import write_bert_like
from tests.s3_server import MotoEndpoint
from tests.test_pipeline import fleet_runtime  # noqa: F401 - the session's Prefect server and Ray

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
SMALL_GROUPS = 24 * 1024  # four layer groups on the synthetic model: several tasks per run
ONE_GROUP_MIB = "1"


# --------------------------------------------------------------------------- helpers


def digests(store: ObjectStore, prefix: str = "artifacts/") -> dict[str, str]:
    """sha256 of every object under ``prefix`` (each read verified against its recorded checksum)."""
    return {key: hashlib.sha256(store.get_bytes(key)).hexdigest() for key in store.list(prefix)}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def whole_deltas(store: ObjectStore, scratch: Path) -> list[CatalogRow]:
    """The catalog's rows, after checking that each ok row's delta is complete and matches the row."""
    rows = Catalog(store).rows()
    for row in rows:
        if row.status == "ok":
            dest = scratch / uuid.uuid4().hex
            download_delta(store, row.params_dict["prefix"], dest, expected_sha256=row.sha256)
            DeltaArtifact.open(dest, expected_sha256=row.sha256)
    return rows


def run_args(model: str, base: Path, tuned: Path, store: str, methods: str, group_mib: str) -> list[str]:
    return [
        "run", "--model", model, "--base", str(base), "--finetuned", str(tuned), "--ranks", "1",
        "--methods", methods, "--group-mib", group_mib, "--store", store,
    ]


class WorkerKiller:
    """SIGKILL one Ray worker process whose title says it runs a task named ``task*``, once.

    Ray titles a worker process ``ray::<task name>`` while it runs a task. ``moment``: "start"
    kills as soon as one is seen, "running" 0.1 s later if it still runs that task, "stored"
    once the run's first payload is in ``store`` (a task that already wrote its output).
    """

    def __init__(self, task: str, moment: str, store: Path) -> None:
        self.title, self.moment, self.store = f"ray::{task}".encode(), moment, store
        self.killed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hunt, daemon=True)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _running(self) -> int | None:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and self._title(int(entry.name)).startswith(self.title):
                return int(entry.name)
        return None

    @staticmethod
    def _title(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    def _hunt(self) -> None:
        while not self._stop.wait(0.005):
            if self.moment == "stored" and not any(self.store.rglob("payload-*.safetensors")):
                continue
            pid = self._running()
            if pid is None:
                continue
            if self.moment == "running":
                time.sleep(0.1)  # a task of the tiny pair may finish within 0.3 s
                if not self._title(pid).startswith(self.title):
                    continue
            os.kill(pid, signal.SIGKILL)
            self.killed = self._title(pid).decode(errors="replace") or f"pid {pid}"
            return


class Outage:
    """Stop the S3 server right after it stores the first payload under ``prefix``.

    The trigger is moto's own ``put_object`` (the server side, in this process), so the outage
    starts at the same point of every run. ``seconds``: start the server again after that long;
    None keeps it down until the block exits.
    """

    def __init__(self, endpoint: MotoEndpoint, prefix: str, seconds: float | None, monkeypatch: Any) -> None:
        from moto.s3.models import S3Backend

        self.endpoint, self.seconds = endpoint, seconds
        self.stopped_at: float | None = None
        self._stored = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._control, daemon=True)
        real_put = S3Backend.put_object

        def put_object(backend: Any, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
            stored = real_put(backend, bucket_name, key_name, *args, **kwargs)
            if key_name.startswith(f"{prefix}/artifacts/") and "/payload-" in key_name:
                self._stored.set()
            return stored

        monkeypatch.setattr(S3Backend, "put_object", put_object)

    def __enter__(self) -> Outage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.endpoint.start()

    def _control(self) -> None:
        while not self._stored.wait(0.05):
            if self._done.is_set():
                return
        time.sleep(0.05)  # let the triggering PUT's response go out
        self.endpoint.stop()
        self.stopped_at = time.monotonic()
        self._done.wait(self.seconds)
        self.endpoint.start()


# --------------------------------------------------------------------------- the undisturbed run

SWEEP = SweepSpec(ranks=(1,), methods=("magtruncsvd",), group_mib=SMALL_GROUPS / MIB)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """One synthetic pair for the module, so that one undisturbed run is the reference of several tests."""
    root = tmp_path_factory.mktemp("fault-pair")
    base = write_bert_like(root / "base", layers=2, hidden=32, intermediate=64, vocab=50, seed=0)
    write_bert_like(root / "ft", layers=2, hidden=32, intermediate=64, vocab=50, seed=1, base=base)
    return root / "base", root / "ft"


@pytest.fixture(scope="module")
def undisturbed(fleet_runtime, pair, tmp_path_factory) -> dict[str, str]:  # noqa: F811
    """Digests of the artifacts of model "faults" under ``SWEEP``, compressed with no fault."""
    store = str(tmp_path_factory.mktemp("undisturbed"))
    run_model(ModelSpec("faults", *map(str, pair)), SWEEP, store)
    expected = digests(open_store(store))
    assert len([key for key in expected if "/payload-" in key]) > 2  # several tasks to disturb
    return expected


# --------------------------------------------------------------------------- Ray workers


KILL_MOMENTS = ("start", "running", "stored")


def test_killed_ray_workers_are_retried_to_byte_identical_artifacts(pair, undisturbed, tmp_path, reliability):
    model = ModelSpec("faults", *map(str, pair))
    started, outcomes = time.monotonic(), []
    for moment in KILL_MOMENTS:
        store = tmp_path / moment
        with WorkerKiller(f"compress {model.name} ", moment, store) as killer:
            rows = run_model(model, SWEEP, str(store))
        same = digests(open_store(str(store))) == undisturbed
        outcomes.append((moment, killer.killed, [row.status for row in rows], same))
    survived = sum(bool(killed) and statuses == ["ok"] and same for _, killed, statuses, same in outcomes)
    reliability.fault(
        "Ray worker process SIGKILLed while compressing (at task start, 0.1 s in, after its payload)",
        tried=len(outcomes),
        survived=survived,
        checked="the run completes (Ray retries the task); every artifact byte-identical (sha256) to an "
        "undisturbed run's",
        seconds=time.monotonic() - started,
    )
    assert survived == len(KILL_MOMENTS), outcomes


# --------------------------------------------------------------------------- the flow's process


KILL_POINTS = {
    # point, n-th publish: (manifests, catalog rows) the kill must leave
    ("manifest", 2): (1, 0),
    ("catalog", 2): (2, 1),
}


def test_flow_killed_between_artifacts_and_catalog_rows(fleet_runtime, synthetic_pair, tmp_path, reliability):  # noqa: F811
    base, tuned = synthetic_pair
    runtime = ["--prefect-api-url", fleet_runtime.api_url, "--ray-address", fleet_runtime.ray_address]

    def args(store: Path) -> list[str]:
        return run_args("flow-kill", base, tuned, str(store), "truncsvd,magtruncsvd", ONE_GROUP_MIB) + runtime

    assert main(args(tmp_path / "undisturbed")) == 0
    expected = digests(open_store(str(tmp_path / "undisturbed")))

    started, outcomes, reruns, rerun_seconds = time.monotonic(), [], 0, 0.0
    for (point, nth), (manifests, catalogued) in KILL_POINTS.items():
        root = tmp_path / f"killed-at-{point}"
        child = subprocess.run(
            [sys.executable, "-m", "tests.killed_flow", point, str(nth), *args(root)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
        store = open_store(str(root))
        left = whole_deltas(store, tmp_path / "check")  # no row points at a missing or partial delta
        committed = [key for key in store.list("artifacts/") if key.endswith("/manifest.json")]
        assert (len(committed), len(left)) == (manifests, catalogued)  # killed where intended

        assert main(args(root)) == 0  # the rerun finishes the work
        rows = whole_deltas(store, tmp_path / "check")
        finished = (
            [row.status for row in rows] == ["ok", "ok"]
            and Catalog(store).version() == 2  # created, then one commit per variant: nothing appended twice
            and digests(store) == expected
        )
        outcomes.append(((point, nth), finished))

        before, objects, rerun_started = mtimes(root), digests(store, ""), time.monotonic()
        assert main(args(root)) == 0  # rerunning a finished run
        rerun_seconds += time.monotonic() - rerun_started
        reruns += mtimes(root) == before and digests(store, "") == objects
    survived = sum(finished for _, finished in outcomes)
    reliability.fault(
        "flow process SIGKILLed after writing artifacts, before publishing catalog rows "
        "(before the 2nd manifest; as the 2nd catalog merge starts)",
        tried=len(outcomes),
        survived=survived,
        checked="no catalog row points at a missing or partial object; the rerun completes with one row per "
        "delta and artifacts byte-identical to an undisturbed run's",
        seconds=time.monotonic() - started - rerun_seconds,
    )
    reliability.fault(
        "rerun of a finished run",
        tried=len(outcomes),
        survived=reruns,
        checked="no object rewritten (same bytes, same mtime), no catalog commit",
        seconds=rerun_seconds,
    )
    assert survived == len(KILL_POINTS) and reruns == len(KILL_POINTS), outcomes


# --------------------------------------------------------------------------- the S3 server


def test_s3_server_stopped_mid_run(s3_endpoint, s3_server, pair, undisturbed, tmp_path, reliability, monkeypatch):
    root = f"{s3_server}/{uuid.uuid4().hex}"
    key_root = root.removeprefix("s3://").partition("/")[2]
    model = ModelSpec("faults", *map(str, pair))

    started = time.monotonic()
    with Outage(s3_endpoint, f"{key_root}/blip", 2.0, monkeypatch) as blip:
        rows = run_model(model, SWEEP, f"{root}/blip")
    store = open_store(f"{root}/blip")
    short_ok = blip.stopped_at is not None and [row.status for row in rows] == ["ok"]
    short_ok = short_ok and digests(store) == undisturbed and len(whole_deltas(store, tmp_path)) == 1
    blip_seconds, started = time.monotonic() - started, time.monotonic()

    with Outage(s3_endpoint, f"{key_root}/down", None, monkeypatch) as down:
        with pytest.raises(EndpointUnreachableError) as failure:  # what the CLI prints as its one error line
            run_model(model, SWEEP, f"{root}/down")
        failed_after = time.monotonic() - (down.stopped_at or time.monotonic())
    error = str(failure.value)
    store = open_store(f"{root}/down")
    stored = digests(store)  # every object still matches the checksum recorded when it was written
    intact = bool(stored) and all(undisturbed.get(key) == digest for key, digest in stored.items())
    intact = intact and not whole_deltas(store, tmp_path)
    clear = "cannot reach S3 endpoint http://127.0.0.1:" in error and "after 5 attempt(s)" in error
    rows = run_model(model, SWEEP, f"{root}/down")
    resumed = [row.status for row in rows] == ["ok"] and digests(store) == undisturbed
    resumed = resumed and len(whole_deltas(store, tmp_path)) == 1
    reliability.fault(
        "S3 server stopped for 2 s after the first payload, then restarted",
        tried=1,
        survived=int(short_ok),
        checked="the retries (botocore backoff, then Prefect task retries) ride it out; artifacts byte-identical "
        "to an undisturbed run's",
        seconds=blip_seconds,
    )
    reliability.fault(
        "S3 server stopped after the first payload until the run gives up",
        tried=1,
        survived=int(down.stopped_at is not None and clear and intact and resumed),
        checked=f"one clear error {failed_after:.0f} s after the stop (bounded retries with backoff); every stored "
        "object intact; the next run resumes and finishes, byte-identical",
        seconds=time.monotonic() - started,
    )
    assert short_ok, "the run did not ride out a 2 s outage"
    assert down.stopped_at is not None and clear, error
    assert failed_after < 120 and intact and resumed


# --------------------------------------------------------------------------- concurrent runs


RUNS = 8


def test_eight_concurrent_flow_runs_append_to_one_catalog(fleet_runtime, synthetic_pair, s3_server, reliability):  # noqa: F811
    base, tuned = synthetic_pair
    store_uri = f"{s3_server}/{uuid.uuid4().hex}"
    sweep = SweepSpec(ranks=(1,), methods=("truncsvd",), group_mib=1)
    barrier, done = threading.Barrier(RUNS), threading.Event()
    rows: dict[int, tuple[CatalogRow, ...]] = {}
    errors: list[BaseException] = []
    reads: list[int] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            rows[i] = run_model(ModelSpec(f"concurrent-{i}", str(base), str(tuned)), sweep, store_uri)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def read() -> None:
        """Read the catalog over and over: rows only appear, whole, once each."""
        catalog, seen = Catalog(open_store(store_uri)), set()
        try:
            while not done.is_set():
                df = catalog.read()
                ids = set(df["artifact_id"])
                if not (df["artifact_id"].is_unique and seen <= ids):
                    raise AssertionError(f"catalog went from {sorted(seen)} to {sorted(df['artifact_id'])}")
                for record in df.to_dict("records"):
                    CatalogRow.from_record(record)  # every field present and valid
                seen = ids
                reads.append(len(ids))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    started = time.monotonic()
    reader = threading.Thread(target=read)
    runs = [threading.Thread(target=run, args=(i,)) for i in range(RUNS)]
    for thread in [reader, *runs]:
        thread.start()
    for thread in runs:
        thread.join(timeout=600)
    done.set()
    reader.join(timeout=60)
    final = Catalog(open_store(store_uri)).read()
    survived = sum(len(rows.get(i, ())) == 1 and rows[i][0].status == "ok" for i in range(RUNS))
    whole = len(final) == RUNS and final["artifact_id"].is_unique and not errors
    reliability.fault(
        f"{RUNS} concurrent flow runs appending to one catalog on S3",
        tried=RUNS,
        survived=survived if whole else 0,
        checked=f"{RUNS} rows, no duplicates; {len(reads)} concurrent reads saw rows only appear, each whole",
        seconds=time.monotonic() - started,
    )
    assert not errors, errors
    assert survived == RUNS and whole, final[["model", "status"]]
    assert set(final["model"]) == {f"concurrent-{i}" for i in range(RUNS)}
    assert len(reads) > 1 and reads[0] < RUNS  # the reader really read while runs were appending


def run_model(model: ModelSpec, sweep: SweepSpec, store: str) -> tuple[CatalogRow, ...]:
    from flows.pipeline import run_model as run  # Prefect is imported once the runtime has set its API

    return run(model, sweep, store)
