"""Credentials, object keys and untrusted artifacts.

* Credentials come from the AWS environment only: the session's S3 fixture sets distinctive fake
  ones (``tests.s3_server``), a flow run and CLI commands (failing ones included) are run, and
  everything they produced is searched for both strings: Python log records, the captured
  stdout and stderr, catalog rows, every stored object, the Prefect API's logs and artifacts,
  and the Ray session's log files. The secret key may appear nowhere. The access key id, which
  AWS treats as an identifier, may appear only in botocore's own DEBUG records (the SDK logs
  its request headers at that level; our CLI never enables it).
* Object keys stay under the configured prefix: a run on S3 adds keys below its prefix only.
* Reading an untrusted artifact cannot execute code: pickles that create a file when unpickled,
  placed where a payload, a manifest, a checkpoint or a catalog part is expected, are refused
  with a clear error and the file never appears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
import socket
import uuid
from pathlib import Path

import boto3
import pytest

from osd_cli.main import main
from osd_core.compress import compress_checkpoint
from osd_core.config import CompressionConfig
from osd_io.catalog import Catalog, CatalogRow
from osd_io.storage import LocalStore, open_store
from tests.s3_server import S3_ACCESS_KEY, S3_BUCKET, S3_SECRET
from tests.test_pipeline import fleet_runtime  # noqa: F401 - the session's Prefect server and Ray


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """Run ``osd-fleet`` in this process: exit status, its ``osd-fleet: error:`` line (if any), all it printed."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, next((line for line in err.splitlines() if line.startswith("osd-fleet: error:")), ""), out + err


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bucket_keys() -> set[str]:
    pages = boto3.session.Session().client("s3").get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def prefect_texts() -> list[str]:
    """Every log line, artifact and flow run (with its parameters) the session's Prefect API holds."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    texts: list[str] = []
    with get_client(sync_client=True) as client:
        while page := client.read_logs(limit=200, offset=len(texts)):
            texts.extend(log.message for log in page)
        texts.extend(json.dumps(a.model_dump(mode="json")) for a in client.read_artifacts())
        texts.extend(json.dumps(run.model_dump(mode="json")) for run in client.read_flow_runs(limit=200))
    return texts


def ray_log_texts() -> list[str]:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public accessor
    return [path.read_text(errors="replace") for path in logs.rglob("*") if path.is_file()]


def sdk_debug(record: logging.LogRecord) -> bool:
    return record.levelno < logging.INFO and record.name.startswith("botocore")


def test_credentials_never_leak_and_keys_stay_under_the_prefix(
    fleet_runtime, synthetic_pair, s3_server, tmp_path, caplog, capsys, monkeypatch, reliability  # noqa: F811
):
    caplog.set_level(logging.DEBUG)
    base, tuned = synthetic_pair
    prefix = f"session/{uuid.uuid4().hex}"
    store = f"s3://{S3_BUCKET}/{prefix}/store"
    before = bucket_keys()
    ran = [
        cli(capsys, "-v", "run", "--model", "secure", "--base", base, "--finetuned", tuned, "--ranks", "1",
            "--methods", "magtruncsvd", "--store", store),
        cli(capsys, "catalog", "list", "--store", store, "--json"),
    ]
    assert [code for code, _, _ in ran] == [0, 0]
    assert {key.partition(f"{prefix}/")[0] for key in bucket_keys() - before} == {""}  # all below the prefix

    refused = {"store: bucket does not exist": cli(capsys, "catalog", "list", "--store", "s3://osd-no-such-bucket/x")}
    with monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
        refused["store: endpoint unreachable, during a flow run"] = cli(
            capsys, "-v", "run", "--model", "secure", "--base", base, "--finetuned", tuned, "--ranks", "1",
            "--methods", "magtruncsvd", "--store", store,
        )
        env.setenv("AWS_ENDPOINT_URL", f"http://{S3_ACCESS_KEY}:{S3_SECRET}@127.0.0.1:{closed_port()}")
        refused["store: endpoint URL carrying credentials"] = cli(capsys, "catalog", "list", "--store", store)
    for case, (code, error, _) in refused.items():
        assert code == 2 and error, case
        reliability.refused(case, error)

    frame = Catalog(open_store(store)).read()
    produced = {
        "catalog rows": [frame.to_string(), frame.to_json(date_format="iso")],
        "stored objects": [open_store(store).get_bytes(key).decode("latin-1") for key in open_store(store).list()],
        "captured output": [printed for _, _, printed in [*ran, *refused.values()]],
        "Prefect logs, artifacts and runs": prefect_texts(),
        "Ray log files": ray_log_texts(),
        "log records": [r.getMessage() for r in caplog.records if not sdk_debug(r)],
        "botocore DEBUG records": [r.getMessage() for r in caplog.records if sdk_debug(r)],
    }
    leaks = [where for where, texts in produced.items() for text in texts if S3_SECRET in text]
    leaks += [where for where, texts in produced.items() if where != "botocore DEBUG records" for text in texts
              if S3_ACCESS_KEY in text]
    assert not leaks, sorted(set(leaks))
    assert len(frame) == 1 and produced["Prefect logs, artifacts and runs"] and produced["Ray log files"]


class Trap:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


@pytest.fixture
def trap(tmp_path) -> tuple[bytes, Path]:
    """A pickle payload and the file it creates when unpickled (shown to work on a decoy first)."""
    decoy = tmp_path / "decoy"
    pickle.loads(pickle.dumps(Trap(decoy))).close()
    assert decoy.exists()
    marker = tmp_path / "code-ran"
    return pickle.dumps(Trap(marker)), marker


def test_untrusted_pickles_are_refused_without_running(synthetic_pair, tmp_path, trap, capsys, reliability):
    base, tuned = synthetic_pair
    payload, marker = trap
    good = tmp_path / "delta"
    compress_checkpoint(base, tuned, good, CompressionConfig(method="magtruncsvd", rank=1, extra_rank=1))

    forged = tmp_path / "forged-payload"  # the manifest vouches for the pickle: only the format check is left
    shutil.copytree(good, forged)
    manifest = json.loads((forged / "manifest.json").read_text())
    name = sorted(manifest["payloads"])[0]
    (forged / name).write_bytes(payload)
    manifest["payloads"][name] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    (forged / "manifest.json").write_text(json.dumps(manifest))
    pickled_manifest = tmp_path / "pickled-manifest"
    shutil.copytree(good, pickled_manifest)
    (pickled_manifest / "manifest.json").write_bytes(payload)
    pickle_only, disguised = tmp_path / "pickle-only", tmp_path / "disguised"
    for checkpoint, file in ((pickle_only, "pytorch_model.bin"), (disguised, "model.safetensors")):
        checkpoint.mkdir()
        shutil.copy(tuned / "config.json", checkpoint)
        (checkpoint / file).write_bytes(payload)
    parts = LocalStore(tmp_path / "parts-store")  # an osd-fleet 0.1 catalog, one part forged
    parts.put_bytes("catalog/parts/20260101T000000000000Z-forged.parquet", payload)
    table = LocalStore(tmp_path / "table-store")  # a Delta catalog whose one data file is forged
    Catalog(table).append([CatalogRow(
        model="m", revision="r", base="b", method="truncsvd", rank=1, extra_rank=0, allocation="uniform",
        budget_bits=1, paper_bits=1, bytes=1, metric="accuracy", eval_data="", uri="u", sha256="0" * 64,
        artifact_id="a",
    )])
    (data_file,) = (table.root / "catalog").glob("*.parquet")
    data_file.write_bytes(payload)

    out = tmp_path / "out"
    cases = {
        "delta payload replaced by a pickle, manifest checksums forged to match":
            ("reconstruct", "--base", base, "--delta", forged, "--out", out),
        "delta manifest replaced by a pickle":
            ("reconstruct", "--base", base, "--delta", pickled_manifest, "--out", out),
        "fine-tune holding a code-running pytorch_model.bin only":
            ("compress", "--base", base, "--finetuned", pickle_only, "--out", out, "--method", "truncsvd"),
        "pickle named model.safetensors": ("compress", "--base", base, "--finetuned", disguised, "--out", out),
        "catalog part replaced by a pickle, then migrated": ("catalog", "migrate", "--store", parts.root),
        "catalog table's data file replaced by a pickle": ("catalog", "list", "--store", table.root),
    }
    for case, argv in cases.items():
        code, error, _ = cli(capsys, *argv)
        assert code == 2 and error, case
        reliability.refused(case, error)
        assert not marker.exists(), f"{case}: the pickle ran"
        assert not out.exists(), case
