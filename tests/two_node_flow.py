"""Run one sweep on a Ray cluster this process joins; print its rows and the node of each layer group.

A child of ``test_cluster``: ``python -m tests.two_node_flow RAY_ADDRESS HOME BASE TUNED STORE GROUP_BYTES``.
A process joins one Ray cluster, and the suite's other tests share a local Ray of their own. The
worker's ``GroupResult`` names the node that ran it; this script reads the results on their way to
the commit (a pass-through wrapper around the flow's ``commit_task``) and prints them as JSON.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import ray

from flows import pipeline
from flows.fleet_config import ModelSpec, SweepSpec
from flows.runtime import start_runtime, stop_runtime

MIB = 1 << 20


def main(address: str, home: str, base: str, tuned: str, store: str, group_bytes: str) -> None:
    start_runtime(home=home, ray_address=address)
    groups: list[dict[str, str]] = []
    commit = pipeline.commit_task

    def recording(model: Any, inputs: Any, target: Any, results: list[Any], *rest: Any) -> Any:
        groups.extend({"payload": r.payload, "node": r.node, "device": r.device} for r in results)
        return commit(model, inputs, target, results, *rest)

    pipeline.commit_task = recording
    sweep = SweepSpec(ranks=(1,), methods=("truncsvd",), group_mib=int(group_bytes) / MIB)
    try:
        rows = pipeline.run_model(ModelSpec("two-node", base, tuned), sweep, store)
        nodes = {node["NodeID"]: sorted(node["Resources"]) for node in ray.nodes() if node["Alive"]}
    finally:
        stop_runtime()
    print(json.dumps({"rows": [{"status": r.status, "params": r.params_dict, "sha256": r.sha256} for r in rows],
                      "groups": groups, "nodes": nodes}))


if __name__ == "__main__":
    main(*sys.argv[1:])
