"""Serve the two operational deployments from code: the scan on a cron schedule, compress on an event.

The code-first twin of ``infra/prefect.yaml`` (which declares the same two deployments for
``prefect deploy`` and a ``process`` work pool). ``osd-fleet serve`` calls
:func:`serve_deployments`: it starts (or joins) the runtime once, exports ``RAY_ADDRESS`` so the
flow-run processes ``prefect.serve`` starts join the same Ray instead of starting their own, and
serves until interrupted. :func:`build_deployments` only builds the ``RunnerDeployment`` objects
(no API call), which the tests inspect.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from prefect.events import DeploymentEventTrigger

from flows.operations import CHECKPOINT_EVENT, DEFAULT_SWEEP, RESOURCE_PREFIX, compress_checkpoint, scan_checkpoints

SCAN_DEPLOYMENT = "scan-checkpoints"
COMPRESS_DEPLOYMENT = "on-checkpoint-written"
# The compress flow's parameters, rendered by the automation from the event (v1-style templates
# keep the payload's JSON types: a missing store arrives as None, and the flow falls back to
# $OSD_FLEET_STORE).
TRIGGER_PARAMETERS: dict[str, str] = {
    "model": "{{ event.payload.model }}",
    "checkpoint": "{{ event.payload.checkpoint }}",
    "base": "{{ event.payload.base }}",
    "store": "{{ event.payload.store }}",
}


def checkpoint_trigger(**overrides: Any) -> DeploymentEventTrigger:
    """Run the deployment once per ``osd-fleet.checkpoint.written`` event, with the payload's URIs."""
    spec: dict[str, Any] = {
        "name": "osd-fleet checkpoint written",
        "match": {"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
        "expect": {CHECKPOINT_EVENT},
        "for_each": {"prefect.resource.id"},
        "posture": "Reactive",
        "threshold": 1,
        "parameters": dict(TRIGGER_PARAMETERS),
    }
    spec.update(overrides)
    return DeploymentEventTrigger(**spec)


def build_deployments(
    *,
    prefix_uri: str,
    base_uri: str,
    store_uri: str,
    cron: str = "*/30 * * * *",
    sweep: dict[str, Any] | None = None,
    calibration: str | None = None,
    eval: str | None = None,
) -> list[Any]:
    """The scan deployment (cron) and the compress deployment (event trigger), not yet registered."""
    sweep = dict(sweep or DEFAULT_SWEEP)
    scan = scan_checkpoints.to_deployment(
        name=SCAN_DEPLOYMENT,
        cron=cron,
        parameters={
            "prefix_uri": prefix_uri,
            "base_uri": base_uri,
            "store_uri": store_uri,
            "sweep": sweep,
            "calibration": calibration,
            "eval": eval,
        },
        description="Compress every checkpoint under the prefix that the catalog lacks.",
        tags=["osd-fleet"],
    )
    compress = compress_checkpoint.to_deployment(
        name=COMPRESS_DEPLOYMENT,
        triggers=[checkpoint_trigger()],
        parameters={"store": store_uri, "sweep": sweep, "calibration": calibration, "eval": eval},
        description=f"Compress a checkpoint announced by a {CHECKPOINT_EVENT} event.",
        tags=["osd-fleet"],
    )
    return [scan, compress]


def serve_deployments(*, runtime: dict[str, Any] | None = None, **deployment: Any) -> None:
    """Start the runtime once, then serve :func:`build_deployments` until interrupted."""
    from prefect import serve

    from flows.runtime import start_runtime

    ready = start_runtime(**(runtime or {}))
    os.environ["RAY_ADDRESS"] = ready.ray_address  # flow-run subprocesses join this Ray
    # Ray 2.60 starts clusters with token auth, and a driver joining by address sends the token only
    # in token mode: without this the flow runs of a Ray started here fail with InvalidAuthToken.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("OSD_FLEET_STORE", deployment["store_uri"])
    # Training jobs need this URL to notify (PREFECT_API_URL), so say it even when it was chosen here.
    print(f"osd-fleet: serving on Prefect API {ready.api_url}, Ray {ready.ray_address}", file=sys.stderr)
    serve(*build_deployments(**deployment))
