"""Operations: the checkpoint event, the scan flow, the deployments and the infrastructure files.

Runs against the session's Prefect server and Ray (``fleet_runtime`` of ``tests.test_pipeline``,
the same fixture object, so whichever module starts them first starts them once).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ObjectNotFound

from flows.fleet_config import SCAN_SWEEP, sweep_from_dict
from flows.operations import (
    CHECKPOINT_EVENT,
    checkpoint_dirs,
    checkpoint_event,
    compress_checkpoint,
    find_checkpoints,
    notify_checkpoint,
    run_scan,
)
from osd_cli.main import main
from osd_core.errors import CheckpointError, ConfigError
from osd_io.catalog import Catalog
from osd_io.storage import open_store
from tests.conftest import write_bert_like
from tests.processes import stop_group
from tests.test_pipeline import fleet_runtime, published_report, upload  # noqa: F401 - the session's server and Ray

INFRA = Path(__file__).resolve().parents[1] / "infra"
TINY = dict(layers=2, hidden=32, intermediate=64, vocab=50)
SWEEP = {"ranks": [1], "methods": ["truncsvd"], "group_mib": 0.05}


def checkpoints(root: Path) -> Path:
    """A base and, under ``root/ckpts``: two fine-tunes (one nested), a half-written one, a non-checkpoint."""
    base = write_bert_like(root / "base", seed=0, **TINY)
    write_bert_like(root / "ckpts" / "run-a" / "checkpoint-1", seed=1, base=base, **TINY)
    write_bert_like(root / "ckpts" / "run-b", seed=2, base=base, **TINY)
    (root / "ckpts" / "partial").mkdir()
    (root / "ckpts" / "partial" / "config.json").write_text("{}")
    (root / "ckpts" / "partial" / "model.safetensors").write_bytes(b"\x10\x00")  # still being written
    (root / "ckpts" / "notes").mkdir()
    (root / "ckpts" / "notes" / "config.json").write_text("{}")  # no weights: not a checkpoint
    return root / "base"


# --------------------------------------------------------------------------- no runtime


def test_checkpoint_dirs_are_directories_with_config_and_safetensors():
    keys = [
        "a/config.json", "a/model.safetensors", "a/sub/config.json", "a/sub/model.safetensors",
        "b/c/config.json", "b/c/model.safetensors.index.json", "b/c/model-00001-of-00002.safetensors",
        "d/config.json", "e/model.safetensors", "f/config.json.bak", "f/model.safetensors",
    ]
    assert checkpoint_dirs(keys) == ["a", "b/c"]
    assert checkpoint_dirs(["config.json", "model.safetensors", "x/config.json", "x/model.safetensors"]) == [""]


def test_find_checkpoints_names_them_locally_and_on_s3(tmp_path, s3_server):
    base = checkpoints(tmp_path)
    local = find_checkpoints(str(tmp_path / "ckpts"), exclude=(str(base),))
    assert [(c.name, Path(c.uri)) for c in local] == [
        ("partial", tmp_path / "ckpts" / "partial"),
        ("run-b", tmp_path / "ckpts" / "run-b"),
        ("run-a.checkpoint-1", tmp_path / "ckpts" / "run-a" / "checkpoint-1"),
    ]
    assert [c.name for c in find_checkpoints(str(tmp_path), exclude=(str(base),))] == [
        "ckpts.partial", "ckpts.run-b", "ckpts.run-a.checkpoint-1"
    ]
    root = f"{s3_server}/{uuid.uuid4().hex}"
    upload(tmp_path / "ckpts" / "run-b", f"{root}/ckpts/run-b")
    upload(tmp_path / "ckpts" / "run-a" / "checkpoint-1", f"{root}/ckpts/run-a/checkpoint-1")
    upload(base, f"{root}/ckpts/base")
    remote = find_checkpoints(f"{root}/ckpts/", exclude=(f"{root}/ckpts/base/",))
    assert [(c.name, c.uri) for c in remote] == [
        ("run-b", f"{root}/ckpts/run-b"),
        ("run-a.checkpoint-1", f"{root}/ckpts/run-a/checkpoint-1"),
    ]
    with pytest.raises(ConfigError, match="checkpoint prefix is not a directory"):
        find_checkpoints(str(tmp_path / "absent"))


def test_event_shape_and_refusals(tmp_path, monkeypatch):
    resource, payload = checkpoint_event("s3://b/ckpt", "s3://b/base", "sentiment-v3")
    assert resource["prefect.resource.id"] == "osd-fleet.checkpoint.sentiment-v3"
    assert payload == {"checkpoint": "s3://b/ckpt", "base": "s3://b/base", "model": "sentiment-v3", "store": None}
    with pytest.raises(ConfigError, match="model 'a/b'"):
        checkpoint_event("s3://b/ckpt", "s3://b/base", "a/b")
    with pytest.raises(ConfigError, match="checkpoint must be a non-empty URI"):
        checkpoint_event("", "s3://b/base", "m")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError):
        notify_checkpoint(str(tmp_path / "half"), "s3://b/base", "m", api_url="http://127.0.0.1:9/api")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ConfigError, match="no Prefect API to notify"):
        notify_checkpoint("s3://b/ckpt", "s3://b/base", "m", verify=False)


def test_infra_files_parse_with_the_expected_keys():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    import flows.operations as operations

    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"scan-checkpoints", "on-checkpoint-written"}
    for deployment in deployments.values():
        path, _, name = deployment["entrypoint"].partition(":")
        assert path == "flows/operations.py" and hasattr(getattr(operations, name), "to_deployment")
        assert deployment["work_pool"]["name"] == "osd-fleet"
        assert set(deployment["parameters"]) <= set(getattr(operations, name).parameters.properties)
        assert sweep_from_dict(deployment["parameters"]["sweep"]) == SCAN_SWEEP  # the CLI's and flows' default
    scan = deployments["scan-checkpoints"]
    CronSchedule(cron=scan["schedules"][0]["cron"], timezone=scan["schedules"][0]["timezone"])
    (trigger,) = deployments["on-checkpoint-written"]["triggers"]
    parsed = TypeAdapter(DeploymentTriggerTypes).validate_python(trigger)
    assert parsed.expect == {CHECKPOINT_EVENT}
    assert parsed.match.model_dump() == {"prefect.resource.id": "osd-fleet.checkpoint.*"}
    assert parsed.parameters == {k: f"{{{{ event.payload.{k} }}}}" for k in ("model", "checkpoint", "base", "store")}

    pool = json.loads((INFRA / "process-work-pool.json").read_text())
    assert {"job_configuration", "variables"} <= set(pool)
    assert "env" in pool["variables"]["properties"]

    cluster = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    nodes = cluster["available_node_types"]
    assert nodes[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    assert any(node["resources"].get("GPU", 0) >= 1 for node in nodes.values())
    assert any("--dashboard-host=127.0.0.1" in command for command in cluster["head_start_ray_commands"])
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # the launcher's own schema (`ray up` checks it first)

    kuberay = yaml.safe_load((INFRA / "kuberay-raycluster.yaml").read_text())
    assert (kuberay["apiVersion"], kuberay["kind"]) == ("ray.io/v1", "RayCluster")
    head = kuberay["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    (gpu,) = kuberay["spec"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"] for e in gpu["template"]["spec"]["containers"][0]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID"} <= env


def test_served_deployments_have_the_schedule_and_the_trigger():
    from flows.serve import build_deployments

    scan, compress = build_deployments(prefix_uri="s3://b/ckpts", base_uri="s3://b/base", store_uri="s3://b/fleet",
                                       cron="0 * * * *", sweep=SWEEP)
    assert scan.schedules[0].schedule.cron == "0 * * * *"
    assert scan.parameters["prefix_uri"] == "s3://b/ckpts" and scan.parameters["sweep"] == SWEEP
    (trigger,) = compress.triggers
    trigger.set_deployment_id(uuid.uuid4())
    automation = trigger.as_automation()
    assert automation.trigger.expect == {CHECKPOINT_EVENT}
    assert automation.actions[0].parameters["checkpoint"] == "{{ event.payload.checkpoint }}"
    assert compress.parameters["store"] == "s3://b/fleet"


# --------------------------------------------------------------------------- with the session's server and Ray


def test_notify_emits_the_event_to_the_server(fleet_runtime, synthetic_pair, tmp_path, capsys):  # noqa: F811
    base, tuned = synthetic_pair
    model = f"notify-{uuid.uuid4().hex[:8]}"
    event = notify_checkpoint(str(tuned), str(base), model, store=str(tmp_path / "store"))
    assert event.event == CHECKPOINT_EVENT
    assert event.resource.id == f"osd-fleet.checkpoint.{model}"
    expected = {"checkpoint": str(tuned), "base": str(base), "model": model, "store": str(tmp_path / "store")}
    assert event.payload == expected
    (stored,) = stored_events(model, 1)
    assert stored.id == event.id and stored.payload == expected

    assert main(["notify", "--checkpoint", str(tuned), "--base", str(base), "--model", model, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["resource"]["prefect.resource.id"] == f"osd-fleet.checkpoint.{model}"
    assert printed["payload"]["store"] is None
    assert len(stored_events(model, 2)) == 2
    assert main(["notify", "--checkpoint", str(tuned), "--base", str(base), "--model", "bad/name"]) == 2
    assert "model 'bad/name'" in capsys.readouterr().err


def test_a_second_scan_with_nothing_new_does_nothing(fleet_runtime, tmp_path):  # noqa: F811
    base = checkpoints(tmp_path)
    store = str(tmp_path / "store")
    first = run_scan(str(tmp_path / "ckpts"), str(base), store, SWEEP)
    assert sorted(first.compressed) == ["run-a.checkpoint-1", "run-b"] and not first.failed
    assert set(first.not_ready) == {"partial"} and first.catalogued == ()
    version = Catalog(open_store(store)).version()
    rows = Catalog(open_store(store)).rows()
    assert sorted(r.model for r in rows) == ["run-a.checkpoint-1", "run-b"] and all(r.status == "ok" for r in rows)

    second = run_scan(str(tmp_path / "ckpts"), str(base), store, SWEEP)
    assert sorted(second.catalogued) == ["run-a.checkpoint-1", "run-b"] and second.compressed == ()
    assert Catalog(open_store(store)).version() == version  # no catalog commit, no compression

    # the event-triggered flow on a catalogued checkpoint: the same identities, nothing new
    records = compress_checkpoint(
        "run-b", str(tmp_path / "ckpts" / "run-b"), str(base), store=store, sweep=SWEEP
    )
    assert [r["status"] for r in records] == ["ok"] and Catalog(open_store(store)).version() == version

    write_bert_like(tmp_path / "ckpts" / "run-c", seed=3, base=None, **TINY)
    third = run_scan(str(tmp_path / "ckpts"), str(base), store, SWEEP)
    assert third.compressed == ("run-c",) and Catalog(open_store(store)).version() == version + 1


def test_a_notified_checkpoint_is_compressed_by_osd_fleet_serve(fleet_runtime, synthetic_pair, tmp_path):  # noqa: F811
    """notify → event → automation → flow run → served runner → Ray → catalog rows and artifacts.

    ``osd-fleet serve`` runs as a subprocess joining the session's Prefect API and Ray, as on one
    machine (docs/operations.md); the event names no store, so the run falls back to the
    ``$OSD_FLEET_STORE`` the served process sets.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.serve import COMPRESS_DEPLOYMENT, SCAN_DEPLOYMENT

    base, tuned = synthetic_pair
    store, model = tmp_path / "store", f"served-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "OSD_FLEET_STORE"}
    env.update(RAY_AUTH_MODE="token", PREFECT_RUNNER_POLL_FREQUENCY="1")  # token: joining by address (Ray 2.60)
    command = [
        sys.executable, "-m", "osd_cli", "serve", "--prefix", str(tmp_path / "ckpts"), "--base", str(base),
        "--store", str(store), "--cron", "0 0 1 1 *", "--ranks", "1", "--methods", "truncsvd",
        "--group-mib", "0.05", "--prefect-api-url", fleet_runtime.api_url, "--ray-address", fleet_runtime.ray_address,
        "--prefect-home", str(tmp_path / "serve-home"),
    ]
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        served = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(what: str) -> None:
        assert served.poll() is None, f"osd-fleet serve exited ({served.returncode}) {what}:\n{log.read_text()[-3000:]}"

    names = [f"compress-checkpoint/{COMPRESS_DEPLOYMENT}", f"scan-checkpoints/{SCAN_DEPLOYMENT}"]
    try:
        with get_client(sync_client=True) as client:
            # generous limits: on 2 shared cores under load a served run took up to 85 s; a hang still fails
            deadline = time.monotonic() + 180
            while True:  # served once its deployments and the trigger's automation exist
                alive("before serving")
                with contextlib.suppress(ObjectNotFound):
                    deployment = client.read_deployment_by_name(names[0])
                    if client.read_resource_related_automations(f"prefect.deployment.{deployment.id}"):
                        break
                assert time.monotonic() < deadline, f"not served in 180 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
            time.sleep(2)  # let the automation reach the trigger engine
            assert main(["notify", "--checkpoint", str(tuned), "--base", str(base), "--model", model]) == 0

            by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            deadline = time.monotonic() + 300
            while not (runs := client.read_flow_runs(deployment_filter=by_deployment)) or not runs[0].state.is_final():
                alive("while the flow run was pending")
                assert time.monotonic() < deadline, f"no finished run in 300 s: {runs}\n{log.read_text()[-3000:]}"
                time.sleep(1)
        (run,) = runs
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
        assert run.parameters["model"] == model and run.parameters["checkpoint"] == str(tuned)
        assert run.parameters["base"] == str(base) and run.parameters["store"] is None
        assert run.parameters["sweep"]["methods"] == ["truncsvd"]  # the deployment's own parameters stay

        (row,) = Catalog(open_store(str(store))).rows(model)
        assert row.status == "ok" and row.method == "truncsvd" and row.bytes > 0 and row.uri.startswith("file://")
        table, plot = published_report(model)
        assert [(r["status"], r["new"], r["uri"]) for r in table] == [("ok", True, row.uri)]
        assert "has a measured accuracy" in plot  # no eval data given: no plot, and the report says why
    finally:
        stop_group(served, timeout=20)
        with get_client(sync_client=True) as client:
            for name in names:
                with contextlib.suppress(ObjectNotFound):
                    deployment_id = client.read_deployment_by_name(name).id
                    client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
                    client.delete_deployment(deployment_id)


# --------------------------------------------------------------------------- helpers


def stored_events(model: str, count: int, timeout: float = 20.0):
    """The checkpoint events of ``model`` the server has stored, once there are ``count`` of them."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = EventFilter(
        event=EventNameFilter(name=[CHECKPOINT_EVENT]),
        resource=EventResourceFilter(id=[f"osd-fleet.checkpoint.{model}"]),
    )
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            events = client.read_events(filter=wanted, limit=50).events  # the server caps limit at 50
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.5)
