"""Two Ray nodes on this machine: layer groups run on both, and meet only in the object store.

The second node joins with ``ray start --address``, its own CPU, a custom resource that names it,
and its own cache directory; inputs and the store are on the S3 server (moto, over HTTP). So a
worker on either node can only have its inputs from S3, and the driver's disk holds nothing the
delta needs. Each node runs under ``ray start --block``, whose termination stops that node alone
(``ray stop`` would stop every Ray on the machine, the suite's own too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from osd_core.compress import compress_checkpoint
from osd_core.config import CompressionConfig
from osd_io.artifacts import download_delta
from osd_io.storage import open_store
from tests.processes import stop_group
from tests.test_pipeline import SMALL_GROUPS, assert_same_layers, upload

RAY = Path(sys.executable).with_name("ray")
SECOND = "osd_second_node"


@contextmanager
def two_nodes(tmp_path: Path) -> Iterator[str]:
    """A head and a second node, each with one CPU and its own cache; yields the head's address."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    with socket_port() as port:
        address = f"127.0.0.1:{port}"
    nodes = []
    try:
        for role, args in (("head", ["--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false"]),
                           ("second", [f"--address={address}", f"--resources={json.dumps({SECOND: 1})}"])):
            env = {**ray_free_environment(), "OSD_FLEET_CACHE": str(tmp_path / f"cache-{role}")}
            log = (tmp_path / f"ray-{role}.log").open("wb")
            command = [str(RAY), "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args]
            nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            wait_for_nodes(address, len(nodes), tmp_path / f"ray-{role}.log")
        yield address
    finally:
        for node in reversed(nodes):
            stop_group(node, timeout=30)


def ray_free_environment() -> dict[str, str]:
    """This process's environment with its Ray settings replaced by the cluster's own.

    The suite's Ray leaves ``RAY_AUTH_MODE`` and more in this process's environment, and Ray 2.60's
    defaults differ by side (a head enables token auth, a client does not), so every node,
    ``ray status`` and the driver get one explicit mode. This loopback-only cluster runs without
    tokens; joining a token cluster by address is covered by ``test_operations`` and
    ``infra/local-stack.sh``.
    """
    kept = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**kept, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@contextmanager
def socket_port() -> Iterator[int]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        yield probe.getsockname()[1]


def wait_for_nodes(address: str, count: int, log: Path, timeout: float = 120.0) -> None:
    """Until ``ray status`` lists ``count`` live nodes (each ``ray start`` returns before its node is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run([str(RAY), "status", f"--address={address}"], capture_output=True, text=True,
                                env=ray_free_environment())
        if status.returncode == 0 and status.stdout.count(" node_") >= count:
            return
        time.sleep(1)
    pytest.fail(f"Ray node {count} did not come up in {timeout:.0f} s; see {log}; `ray status` said "
                f"({status.returncode}): {(status.stdout + status.stderr)[-1500:]}")


def test_layer_groups_run_on_both_nodes_and_meet_only_in_s3(synthetic_pair, s3_server, tmp_path):
    base, tuned = synthetic_pair
    root = f"{s3_server}/{uuid.uuid4().hex}"
    base_uri, tuned_uri = upload(base, f"{root}/base"), upload(tuned, f"{root}/ft")
    store_uri = f"{root}/store"
    with two_nodes(tmp_path) as address:
        child = subprocess.run(
            [sys.executable, "-m", "tests.two_node_flow", address, str(tmp_path / "prefect"), base_uri, tuned_uri,
             store_uri, str(SMALL_GROUPS)],
            capture_output=True, text=True, timeout=600,
            env={**ray_free_environment(), "OSD_FLEET_CACHE": str(tmp_path / "driver")},
        )
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    (second,) = [node for node, resources in result["nodes"].items() if SECOND in resources]
    used = {group["node"] for group in result["groups"]}
    assert len(result["groups"]) > 2 and len(used) == 2 and second in used  # both nodes compressed groups
    (row,) = result["rows"]
    assert row["status"] == "ok"
    delta = download_delta(open_store(store_uri), row["params"]["prefix"], tmp_path / "delta",
                           expected_sha256=row["sha256"])
    reference = compress_checkpoint(base, tuned, tmp_path / "reference", CompressionConfig(method="truncsvd", rank=1))
    assert_same_layers(delta, Path(reference.out_dir))
