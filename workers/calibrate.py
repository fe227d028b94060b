"""The calibration stage: one task per model computes gradients and stores them for workers.

Workers then read only their own layers' entries by reference (``osd_io.sources.CalibrationFile``),
so the gradients of a large model never travel whole through Ray or the flow.
"""

from __future__ import annotations

import logging
from pathlib import Path

from osd_core.outputs import scratch_dir
from osd_io.sources import fetch_file, materialize
from workers.compress import store_at
from workers.jobs import CalibrationJob

log = logging.getLogger(__name__)


def calibrate(job: CalibrationJob) -> str:
    """Compute the model's calibration output unless the store has it; return its URI."""
    from workloads.calibration import calibration_gradients  # imports transformers: only here

    store = store_at(job.store)
    if store.exists(job.key):
        return store.uri_for(job.key)
    base = materialize(job.pair.base, job.pair.base_identity["sha256"])
    finetuned = materialize(job.pair.finetuned, job.pair.finetuned_identity["sha256"])
    with scratch_dir("calib") as scratch:
        rows = fetch_file(job.calibration, Path(scratch) / "data")
        out = calibration_gradients(base, finetuned, rows, job.config, Path(scratch) / "gradients.safetensors")
        store.put_file(job.key, out)
    log.info("%s: stored at %s", job.name, store.uri_for(job.key))
    return store.uri_for(job.key)
