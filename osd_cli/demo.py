"""``osd-fleet demo``: the whole pipeline on packaged workloads, on one machine, with nothing to set up.

Loads the workloads (building and caching them the first time), starts a Prefect API server and
Ray once for this process, runs the sweep over every workload into a local directory store,
prints the catalog and each model's smallest delta that keeps its accuracy, then stops what it
started. This is the command's presentation layer, so it prints; the library logs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.fleet_config import FleetConfig, ModelSpec, SweepSpec
from flows.pipeline import run_fleet
from flows.runtime import start_runtime, stop_runtime
from osd_cli.fleet import format_rows
from osd_io.catalog import Catalog, NoneMeetsError
from osd_io.storage import open_store

ACCURACY_SLACK = 0.02  # default floor: the fine-tune's own accuracy minus this


def run_demo(
    workloads: Sequence[str], store: str, sweep: SweepSpec, *, min_accuracy: float | None, runtime: dict[str, Any]
) -> int:
    """Run the demo; 0 when every variant succeeded, 1 otherwise."""
    started = time.perf_counter()
    models, floors = [], {}
    for name in workloads:
        _say(f"workload {name}: loading (the first build fine-tunes it: a few minutes)")
        workload, base, tuned, rows = _load(name)
        _say(f"  base accuracy {base:.4f}, fine-tune {tuned:.4f} on {rows} eval rows")
        models.append(
            ModelSpec(
                name,
                str(workload.base_dir),
                str(workload.finetuned_dir),
                str(workload.calib_path),
                str(workload.eval_path),
            )
        )
        floors[name] = min_accuracy if min_accuracy is not None else round(tuned - ACCURACY_SLACK, 4)
    fleet = FleetConfig(str(Path(store).resolve()), tuple(models), sweep)
    variants = len(sweep.variants())
    _say(f"sweep: {variants} variants per model ({', '.join(v.label for v in sweep.variants())})")
    _say("starting a Prefect API server and Ray for this process ...")
    try:
        ready = start_runtime(**runtime)
        _say(f"  Prefect API {ready.api_url} (home {ready.home}); Ray {ready.ray_address}")
        rows = run_fleet(fleet)
    finally:
        stop_runtime()
    catalog = Catalog(open_store(fleet.store))
    print(f"\ncatalog at {fleet.store}:")
    print(format_rows([row for row in catalog.rows() if row.model in floors]))
    for name, floor in floors.items():
        try:
            best = catalog.smallest(name, floor)
        except NoneMeetsError as exc:
            print(f"\nsmallest delta of {name} with accuracy >= {floor:.4f}: none ({exc})")
            continue
        print(
            f"\nsmallest delta of {name} with accuracy >= {floor:.4f}: {best.method} r={best.rank} "
            f"{best.allocation}, accuracy {best.accuracy:.4f}, {best.bytes:,} bytes\n  {best.uri}"
        )
    failed = [row for row in rows if row.status != "ok"]
    _say(f"demo finished in {time.perf_counter() - started:.0f} s; {len(rows)} artifacts, {len(failed)} failed")
    return 1 if failed else 0


def _load(name: str) -> tuple[Any, float, float, int]:
    """A workload (built the first time) with its base and fine-tune eval accuracy and eval row count.

    The decoder workloads (``smollm2-*``, after ``make llm``) score log-likelihood ``acc``.
    """
    from workloads import WORKLOADS, UnknownWorkloadError, build_workload  # imports transformers
    from workloads.lm_build import LM_WORKLOADS, build_lm_workload

    if name not in WORKLOADS and name not in LM_WORKLOADS:
        raise UnknownWorkloadError(f"unknown workload {name!r}; known: {', '.join([*WORKLOADS, *LM_WORKLOADS])}")
    if name in LM_WORKLOADS:
        workload = build_lm_workload(name)
        base, tuned = workload.scores["base"]["eval"], workload.scores["finetuned"]["eval"]
        return workload, base["acc"], tuned["acc"], tuned["n"]
    workload = build_workload(name, progress=sys.stderr.isatty())  # the first build trains for minutes
    base, tuned = workload.scores["base"]["eval"], workload.scores["finetuned"]["eval"]
    return workload, base.accuracy, tuned.accuracy, tuned.n


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
