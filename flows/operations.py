"""Operations: announce new checkpoints, scan a prefix for them, and the flows that deployments run.

Two ways a fine-tune reaches the pipeline without anyone typing ``osd-fleet run``:

* **Push.** A training script that has just saved a checkpoint calls :func:`notify_checkpoint`
  (or ``osd-fleet notify``). It emits the Prefect event ``osd-fleet.checkpoint.written`` about
  the resource ``osd-fleet.checkpoint.<model>``, with the URIs in its payload. The deployment of
  :func:`compress_checkpoint` has a trigger on that event (``infra/prefect.yaml``,
  ``flows/serve.py``) whose parameters are templated from the payload, so a run starts seconds
  after the save.
* **Pull.** :func:`scan_checkpoints`, on a cron schedule, lists the fine-tune checkpoints under
  an object-store prefix (directories with ``config.json`` and ``model.safetensors`` or its
  index), and compresses those not yet in the catalog. "In the catalog" is decided by the
  pipeline's own identities (``flows.plan.artifact_id`` of every sweep variant, computed by
  ``flows.pipeline.make_target``), so a scan with nothing new starts no compression and writes
  no catalog commit, and a checkpoint announced by an event and found again by a scan is
  compressed once.

Deployed flows run in a process a Prefect worker (or ``prefect.serve``) starts; they attach to
the Prefect API that launched them and to the Ray cluster in ``$RAY_ADDRESS`` (a local Ray when
unset) once per process, as the CLI does (``flows.runtime``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.fleet_config import (
    SCAN_SWEEP,
    ModelSpec,
    SweepSpec,
    check_calibration,
    require_calibration,
    sweep_from_dict,
)
from flows.pipeline import compress_model, make_target, read_inputs
from flows.runtime import RuntimeStartError, start_runtime
from osd_core.errors import ConfigError, OSDError
from osd_core.settings import to_table
from osd_core.weight_files import INDEX_FILE, SINGLE_FILE
from osd_io.catalog import Catalog
from osd_io.keys import InvalidNameError, safe_name
from osd_io.uris import is_s3, join_uri, local_path
from osd_io.storage import StorageError, open_store

__all__ = [
    "CHECKPOINT_EVENT",
    "DEFAULT_SWEEP",
    "FoundCheckpoint",
    "ScanReport",
    "checkpoint_dirs",
    "checkpoint_event",
    "compress_checkpoint",
    "find_checkpoints",
    "notify_checkpoint",
    "run_scan",
    "scan_checkpoints",
]

CHECKPOINT_EVENT = "osd-fleet.checkpoint.written"
RESOURCE_PREFIX = "osd-fleet.checkpoint."
STORE_ENV = "OSD_FLEET_STORE"  # the store of a deployed compress flow when the event names none
# Deployed flows default to the two methods that need no calibration data.
DEFAULT_SWEEP: dict[str, Any] = to_table(SCAN_SWEEP)
_IN_FLOW: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)


# --------------------------------------------------------------------------- push: the event


def checkpoint_event(
    checkpoint: str, base: str, model: str, store: str | None = None
) -> tuple[dict[str, str], dict[str, Any]]:
    """The resource and payload of a ``osd-fleet.checkpoint.written`` event (validated, nothing sent)."""
    try:
        safe_name(model)
    except InvalidNameError as exc:
        raise ConfigError(f"model {model!r}: {exc}") from None
    for what, uri in (("checkpoint", checkpoint), ("base", base), ("store", store)):
        if uri is not None and (not isinstance(uri, str) or not uri.strip()):
            raise ConfigError(f"{what} must be a non-empty URI, got {uri!r}")
    resource = {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{model}",
        "prefect.resource.name": model,
        "osd-fleet.checkpoint.uri": checkpoint,
    }
    payload = {"checkpoint": checkpoint, "base": base, "model": model, "store": store}
    return resource, payload


def notify_checkpoint(
    checkpoint: str,
    base: str,
    model: str,
    *,
    store: str | None = None,
    verify: bool = True,
    api_url: str | None = None,
    timeout: float = 10.0,
) -> Any:
    """Announce a saved checkpoint to the Prefect API: the event the compress deployment waits for.

    ``verify`` first reads the checkpoint's headers (a few range reads on S3), so a checkpoint
    that is incomplete or not safetensors is refused here, in the training job, rather than in a
    flow run later. ``api_url`` defaults to ``$PREFECT_API_URL``; there must be one, since an
    event sent to a throw-away ephemeral server would start nothing. Returns the emitted
    ``prefect.events.Event`` after handing it to the API (waiting at most ``timeout`` seconds).
    """
    resource, payload = checkpoint_event(checkpoint, base, model, store)
    if verify:
        from osd_io.sources import open_checkpoint

        open_checkpoint(checkpoint)  # CheckpointError names what is missing or broken
    api_url = api_url or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise ConfigError("no Prefect API to notify: set PREFECT_API_URL (or pass --prefect-api-url)")

    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        event = emit_event(CHECKPOINT_EVENT, resource=resource, payload=payload)
        # Sent by a background worker: wait for it, since a training script may exit right after.
        drained = EventsWorker.drain_all(timeout=timeout)
    if not isinstance(drained, tuple):  # called inside an event loop: Prefect sends it in the background
        drained.close()
        drained = (set(), set())
    pending = drained[1]
    if event is None:
        raise RuntimeStartError(f"Prefect did not emit the event (events are disabled for {api_url})")
    if pending:
        raise RuntimeStartError(f"the event for {model!r} was not handed to {api_url} within {timeout:g} s")
    return event


# --------------------------------------------------------------------------- pull: the scan


@dataclass(frozen=True)
class FoundCheckpoint:
    """A checkpoint directory under a scanned prefix and the catalog name it gets."""

    name: str
    uri: str


@dataclass(frozen=True)
class ScanReport:
    """What a scan found and did; names are catalog model names."""

    prefix: str
    found: tuple[str, ...] = ()
    catalogued: tuple[str, ...] = ()  # every variant already has a row: nothing to do
    compressed: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)  # compressed, but a variant or the run failed
    not_ready: dict[str, str] = field(default_factory=dict)  # unreadable now (still being written?): next scan

    @property
    def summary(self) -> str:
        return (
            f"{self.prefix}: {len(self.found)} checkpoint(s), {len(self.catalogued)} already catalogued, "
            f"{len(self.compressed)} compressed, {len(self.failed)} failed, {len(self.not_ready)} not ready"
        )


def checkpoint_dirs(keys: Iterable[str]) -> list[str]:
    """Relative directories (``""`` for the root) that hold a checkpoint, given every file key below a prefix.

    A checkpoint directory has ``config.json`` and ``model.safetensors`` or
    ``model.safetensors.index.json``; directories inside a checkpoint are not searched.
    """
    files = set(keys)
    candidates = sorted(
        {str(PurePosixPath(key).parent) for key in files if PurePosixPath(key).name == "config.json"},
        key=lambda d: (d.count("/"), d),
    )
    found: list[str] = []
    for directory in candidates:
        rel = "" if directory == "." else directory
        prefix = f"{rel}/" if rel else ""
        if f"{prefix}config.json" not in files:
            continue
        if f"{prefix}{SINGLE_FILE}" not in files and f"{prefix}{INDEX_FILE}" not in files:
            continue
        if any(rel == outer or rel.startswith(f"{outer}/") or outer == "" for outer in found):
            continue  # inside a checkpoint already found
        found.append(rel)
    return found


def find_checkpoints(prefix_uri: str, *, exclude: Iterable[str] = ()) -> tuple[FoundCheckpoint, ...]:
    """Every checkpoint under ``prefix_uri`` (local directory or ``s3://bucket/prefix``), by name.

    Names are the path below the prefix with ``/`` as ``.`` (``run-a/checkpoint-500`` →
    ``run-a.checkpoint-500``; the prefix's own name when it is itself a checkpoint). ``exclude``
    lists locations to leave out (the base). A name that is not a safe catalog name raises.
    """
    skip = {_location(uri) for uri in exclude}
    if is_s3(prefix_uri):
        keys = open_store(prefix_uri.rstrip("/")).list("")
    else:
        root = local_path(prefix_uri)
        if not root.is_dir():
            raise ConfigError(f"{prefix_uri}: checkpoint prefix is not a directory")
        keys = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(root).as_posix()
            keys.extend(name if rel == "." else f"{rel}/{name}" for name in filenames if not name.startswith("."))
    found = []
    for rel in checkpoint_dirs(keys):
        uri = join_uri(prefix_uri.rstrip("/"), rel) if rel else prefix_uri.rstrip("/")
        if _location(uri) in skip:
            continue
        name = rel.replace("/", ".") if rel else PurePosixPath(prefix_uri.rstrip("/")).name
        try:
            safe_name(name)
        except InvalidNameError as exc:
            raise ConfigError(f"checkpoint {uri}: cannot be named in the catalog ({exc})") from None
        found.append(FoundCheckpoint(name, uri))
    return tuple(found)


def _location(uri: str) -> str:
    return uri.rstrip("/") if is_s3(uri) else str(local_path(uri).resolve())


@task(name="find-checkpoints", task_run_name="find checkpoints in {prefix_uri}", **_IN_FLOW)
def find_checkpoints_task(prefix_uri: str, base_uri: str) -> tuple[FoundCheckpoint, ...]:
    return find_checkpoints(prefix_uri, exclude=(base_uri,))


@task(name="check-catalog", task_run_name="check {model.name}", **_IN_FLOW)
def missing_variants(model: ModelSpec, sweep: SweepSpec, seen: frozenset[str]) -> int:
    """How many of the sweep's variants of ``model`` have no catalog row: the pipeline's identities.

    Reads headers and content hashes (as the pipeline's plan step does), never tensors.
    """
    inputs = read_inputs.fn(model)
    targets = [make_target(model, inputs, v, sweep.group_bytes()) for v in sweep.variants()]  # ids only
    return sum(t.artifact_id not in seen for t in targets)


@flow(name="scan-checkpoints", flow_run_name="scan {prefix_uri}", validate_parameters=True, persist_result=False)
def scan_checkpoints(
    prefix_uri: str,
    base_uri: str,
    store_uri: str,
    sweep: dict[str, Any] | SweepSpec | None = None,
    calibration: str | None = None,
    eval: str | None = None,
    retry_failed: bool = False,
) -> ScanReport:
    """Compress, evaluate and catalogue every checkpoint under ``prefix_uri`` not yet in the catalog.

    ``sweep`` is a ``[sweep]`` table of a fleet file as a mapping, or a ``SweepSpec`` (default
    :data:`DEFAULT_SWEEP`); ``calibration`` and ``eval`` are shared by every checkpoint. A
    checkpoint counts as done when each variant has a catalog row; failed rows count too unless
    ``retry_failed``, so a checkpoint that fails deterministically is not recompressed every tick.
    Checkpoints whose headers cannot be read yet are left for the next scan.
    """
    for what, uri in (("prefix_uri", prefix_uri), ("base_uri", base_uri), ("store_uri", store_uri)):
        _check_templated(what, uri)
    spec = _as_sweep(sweep)
    require_calibration(spec, calibration, f"checkpoints under {prefix_uri}")
    log = get_run_logger()
    _attach_runtime()
    found = find_checkpoints_task(prefix_uri, base_uri)
    frame = Catalog(open_store(store_uri)).read()
    statuses = ("ok",) if retry_failed else ("ok", "failed")
    seen = frozenset(frame.loc[frame["status"].isin(statuses), "artifact_id"])
    catalogued, compressed, failed, not_ready = [], [], {}, {}
    for checkpoint in found:
        model = ModelSpec(checkpoint.name, base_uri, checkpoint.uri, calibration, eval)
        try:
            missing = missing_variants(model, spec, seen)
        except (OSDError, StorageError) as exc:
            log.warning("%s: not ready (%s); the next scan tries again", checkpoint.uri, exc)
            not_ready[checkpoint.name] = f"{type(exc).__name__}: {exc}"
            continue
        if not missing:
            catalogued.append(checkpoint.name)
            continue
        log.info("%s: %d variant(s) to compress from %s", checkpoint.name, missing, checkpoint.uri)
        try:
            rows = compress_model(model, spec, store_uri)
        except Exception as exc:  # noqa: BLE001 - one checkpoint's failure must not stop the scan
            log.error("%s: compression failed: %s: %s", checkpoint.name, type(exc).__name__, exc)
            failed[checkpoint.name] = f"{type(exc).__name__}: {exc}"
            continue
        bad = [row for row in rows if row.status != "ok"]
        if bad:
            failed[checkpoint.name] = "; ".join(str(row.params_dict.get("error", "failed")) for row in bad)
        else:
            compressed.append(checkpoint.name)
    report = ScanReport(
        prefix_uri,
        tuple(c.name for c in found),
        tuple(catalogued),
        tuple(compressed),
        failed,
        not_ready,
    )
    log.info("%s", report.summary)
    return report


def run_scan(
    prefix_uri: str,
    base_uri: str,
    store_uri: str,
    sweep: SweepSpec | Mapping[str, Any] | None = None,
    *,
    calibration: str | None = None,
    eval: str | None = None,
    retry_failed: bool = False,
    **runtime: Any,
) -> ScanReport:
    """Start the runtime if this process has none (``flows.runtime.start_runtime(**runtime)``), then scan."""
    spec = _as_sweep(sweep)
    require_calibration(spec, calibration, f"checkpoints under {prefix_uri}")
    start_runtime(**runtime)
    return scan_checkpoints(
        prefix_uri, base_uri, store_uri, spec, calibration, eval, retry_failed  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- the event-triggered flow


@flow(
    name="compress-checkpoint",
    flow_run_name="compress-checkpoint {model}",
    validate_parameters=True,
    persist_result=False,
)
def compress_checkpoint(
    model: str,
    checkpoint: str,
    base: str,
    store: str | None = None,
    sweep: dict[str, Any] | SweepSpec | None = None,
    calibration: str | None = None,
    eval: str | None = None,
) -> list[dict[str, Any]]:
    """``compress_model`` for one announced checkpoint, with JSON parameters (what a trigger can pass).

    ``store`` defaults to ``$OSD_FLEET_STORE`` of the flow run's environment (the work pool's
    job variables), for events that name no store. Returns one small record per variant.
    """
    store = store or os.environ.get(STORE_ENV)
    if not store:
        raise ConfigError(f"no store: the event named none and ${STORE_ENV} is not set")
    for what, uri in (("checkpoint", checkpoint), ("base", base), ("store", store)):
        _check_templated(what, uri)
    spec = _as_sweep(sweep)
    spec_model = ModelSpec(model, base, checkpoint, calibration, eval)
    check_calibration((spec_model,), spec)
    _attach_runtime()
    rows = compress_model(spec_model, spec, store)
    return [
        {"label": f"{row.method} r={row.rank} {row.allocation}", "status": row.status, "bytes": row.bytes,
         "accuracy": row.accuracy, "uri": row.uri}
        for row in rows
    ]


# --------------------------------------------------------------------------- helpers


def _as_sweep(sweep: SweepSpec | Mapping[str, Any] | None) -> SweepSpec:
    if isinstance(sweep, SweepSpec):
        return sweep
    return sweep_from_dict(DEFAULT_SWEEP if sweep is None else sweep)


def _check_templated(what: str, value: str) -> None:
    """A deployment parameter left as ``{{ $VAR }}`` means the variable was unset at ``prefect deploy``."""
    if not isinstance(value, str) or not value or "{{" in value:
        raise ConfigError(f"{what} must be a URI, got {value!r} (unset environment variable at deploy time?)")


def _attach_runtime() -> None:
    """In a deployed flow run: join the Prefect API that started it and ``$RAY_ADDRESS``, once per process.

    Flows called from ``run_scan``, the CLI or the tests find the runtime already started.
    """
    import ray

    if ray.is_initialized():
        return
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if not api_url:
        raise RuntimeStartError(
            "no Prefect API: run deployed flows through a worker or prefect.serve, or call run_scan()"
        )
    start_runtime(
        api_url=api_url,
        ray_address=os.environ.get("RAY_ADDRESS"),
        home=os.environ.get("PREFECT_HOME"),
    )
