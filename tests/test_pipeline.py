"""The fleet pipeline end to end: a real local Ray (2 CPUs) and a real Prefect API server.

Both are started once per session by the ``fleet_runtime`` fixture with the same helper the demo
and the CLI use. Flows run on the synthetic and real checkpoint pairs of conftest, against the
local store and the S3 store (moto), and every delta is checked against the single-process
reference path (``osd_core.compress.compress_checkpoint``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.fleet_config import FleetConfig, ModelSpec, SweepSpec, load_fleet_config
from flows.plan import PairLayout, artifact_prefix, delta_id, plan_model
from flows.runtime import start_runtime, stop_runtime
from osd_cli.main import main
from osd_core.artifact import DeltaArtifact
from osd_core.calibration_data import GradientFile
from osd_core.compress import compress_checkpoint
from osd_core.config import CompressionConfig
from osd_core.errors import ConfigError
from osd_core.reconstruct import reconstruct_checkpoint
from osd_io.artifacts import download_delta
from osd_io.catalog import COMPACT_AFTER_FILES, Catalog, CatalogRow, NoneMeetsError
from osd_io.uris import is_s3
from osd_io.storage import S3Store, open_store
from tests.conftest import write_bert_like
from tests.test_causal_lm import CHOICES, TEXTS, write_rows
from tests.s3_server import S3_SECRET

MIB = 1 << 20
SMALL_GROUPS = 24 * 1024  # several layer groups even on the 2-layer synthetic model


@pytest.fixture(scope="session")
def fleet_runtime(s3_server, tmp_path_factory):
    """One Prefect server and one Ray for the session; the S3 environment is set first so workers inherit it.

    Workers cache downloads (checkpoints, calibration outputs) under a session directory, not the user's cache.
    """
    cache = {"OSD_FLEET_CACHE": str(tmp_path_factory.mktemp("worker-cache"))}
    runtime = start_runtime(home=tmp_path_factory.mktemp("prefect"), num_cpus=2, worker_env=cache)
    yield runtime
    stop_runtime()


def upload(local: Path, uri: str) -> str:
    store = open_store(uri)
    for path in sorted(local.iterdir()):
        store.put_file(path.name, path)
    return uri


def inputs_on(backend_uri: str, base: Path, tuned: Path) -> tuple[str, str]:
    """The pair where the store is: uploaded next to an S3 store, in place for a local one."""
    if not is_s3(backend_uri):
        return str(base), str(tuned)
    return upload(base, f"{backend_uri}-inputs/base"), upload(tuned, f"{backend_uri}-inputs/ft")


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def fetched(store_uri: str, row, dest: Path) -> Path:
    return download_delta(open_store(store_uri), row.params_dict["prefix"], dest, expected_sha256=row.sha256)


def assert_same_layers(delta_dir: Path, reference_dir: Path) -> None:
    ours = {layer.name: layer for layer in DeltaArtifact.open(delta_dir).layers()}
    theirs = {layer.name: layer for layer in DeltaArtifact.open(reference_dir).layers()}
    assert ours.keys() == theirs.keys()
    for name, layer in theirs.items():
        assert (ours[name].kind, ours[name].shape, ours[name].k) == (layer.kind, layer.shape, layer.k), name
        assert ours[name].tensors.keys() == layer.tensors.keys(), name
        for part, tensor in layer.tensors.items():
            assert torch.equal(ours[name].tensors[part], tensor), f"{name}::{part}"


# --------------------------------------------------------------------------- planning (no runtime)


def test_plan_groups_follow_shards_and_read_only_headers_from_s3(tmp_path, s3_server, monkeypatch):
    base_state = write_bert_like(
        tmp_path / "base", layers=2, hidden=32, intermediate=64, vocab=50, seed=0, shard_bytes=20_000
    )
    write_bert_like(
        tmp_path / "ft", layers=2, hidden=32, intermediate=64, vocab=50, seed=1, base=base_state, shard_bytes=20_000
    )
    root = f"{s3_server}/{uuid.uuid4().hex}"
    base_uri, tuned_uri = upload(tmp_path / "base", f"{root}/base"), upload(tmp_path / "ft", f"{root}/ft")

    def no_download(self, key, *args, **kwargs):
        raise AssertionError(f"planning downloaded {key}")

    real_get_bytes = S3Store.get_bytes
    monkeypatch.setattr(S3Store, "get_file", no_download)
    monkeypatch.setattr(
        S3Store,
        "get_bytes",
        lambda self, key, **kw: (
            no_download(self, key) if key.endswith(".safetensors") else real_get_bytes(self, key, **kw)
        ),
    )
    remote = PairLayout.read(base_uri, tuned_uri)
    local = PairLayout.read(str(tmp_path / "base"), str(tmp_path / "ft"))
    assert remote.base_identity["sha256"] == local.base_identity["sha256"]
    assert remote.finetuned_identity["sha256"] == local.finetuned_identity["sha256"]

    config = CompressionConfig(method="truncsvd", rank=1)
    plans = [plan_model("syn", pair, config, group_bytes=SMALL_GROUPS) for pair in (local, remote)]
    assert [(g.shard, g.label, [j.name for j in g.layers]) for g in plans[0].groups] == [
        (g.shard, g.label, [j.name for j in g.layers]) for g in plans[1].groups
    ]
    plan = plans[1]
    names = [job.name for group in plan.groups for job in group.layers]
    assert len(names) == len(set(names)) == len(base_state)  # every tensor exactly once (none is a buffer here)
    assert len({g.shard for g in plan.groups}) == len(list((tmp_path / "ft").glob("*.safetensors"))) > 1
    for group in plan.groups:
        assert {Path(job.finetuned.uri).name for job in group.layers} == {group.shard}
        assert sum(4 * job.finetuned.numel for job in group.layers) <= SMALL_GROUPS or len(group.layers) == 1
    assert plan.total_bits == sum(32 * (n + d) for n, d in (job.plan.shape for job in plan.factorised))


def test_fleet_file_resolves_paths_and_refuses_mistakes(tmp_path):
    (tmp_path / "fleet.toml").write_text(
        'store = "store"\n[sweep]\nranks = [1, 2]\nmethods = ["truncsvd"]\nallocations = ["uniform", "global"]\n'
        "group_mib = 0.5\n[sweep.compression]\nseed = 3\n"
        '[[models]]\nname = "m1"\nbase = "b"\nfinetuned = "s3://bucket/ft"\n'
    )
    fleet = load_fleet_config(tmp_path / "fleet.toml")
    assert fleet.store == str(tmp_path / "store") and fleet.models[0].base == str(tmp_path / "b")
    assert fleet.models[0].finetuned == "s3://bucket/ft" and fleet.sweep.group_bytes() == 1 << 19
    assert [v.label for v in fleet.sweep.variants()] == [
        "truncsvd r=1 uniform",
        "truncsvd r=1 global",
        "truncsvd r=2 uniform",
        "truncsvd r=2 global",
    ]
    assert all(v.config.seed == 3 and v.config.extra_rank == 0 for v in fleet.sweep.variants())
    (tmp_path / "bad.json").write_text(
        json.dumps({"store": "s", "models": [{"name": "m", "base": "b", "finetuned": "f", "evil": 1}]})
    )
    with pytest.raises(ConfigError, match="bad.json: models\\[1\\]: unknown field 'evil'"):
        load_fleet_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="model 'm' appears more than once"):
        FleetConfig("s", (ModelSpec("m", "b", "f"), ModelSpec("m", "b", "f")))
    with pytest.raises(ConfigError, match="model 'm': method 'osd' needs a calibration file"):
        FleetConfig("s", (ModelSpec("m", "b", "f"),), SweepSpec(methods=("osd",)))
    with pytest.raises(ConfigError, match="sweep allocations must be among uniform, global, global-all; got 'joint'"):
        SweepSpec(allocations=("joint",))


def test_fractional_budgets_sweep_the_relaxed_methods_and_truncsvd_at_whole_ranks(tmp_path):
    (tmp_path / "fleet.toml").write_text(
        'store = "s"\n[sweep]\nranks = [0.25, 1]\nmethods = ["magtruncsvd", "truncsvd"]\n'
        '[[models]]\nname = "m"\nbase = "b"\nfinetuned = "f"\n'
    )
    labels = [v.label for v in load_fleet_config(tmp_path / "fleet.toml").sweep.variants()]
    # int4 values by default: c = 7r
    assert labels == ["magtruncsvd r=0.25+1.75 uniform", "magtruncsvd r=1+7 uniform", "truncsvd r=1 uniform"]
    with pytest.raises(ConfigError, match="sweep has nothing to run: truncsvd needs whole ranks, got \\[0.5\\]"):
        SweepSpec(ranks=(0.5,), methods=("truncsvd",))
    for bad in ((0,), (-1.5,), (float("inf"),), (True,)):
        with pytest.raises(ConfigError, match="sweep ranks must be numbers > 0"):
            SweepSpec(ranks=bad)


def test_only_unreachable_storage_is_retried():
    from prefect.states import Failed

    from osd_core.errors import CheckpointError
    from osd_io.storage import EndpointUnreachableError
    from workers.tasks import _storage_unreachable

    assert _storage_unreachable(None, None, Failed(data=EndpointUnreachableError("endpoint down")))
    assert not _storage_unreachable(None, None, Failed(data=CheckpointError("tensor 'x' contains 1 NaN")))


# --------------------------------------------------------------------------- flows


def other_row(artifact_id: str) -> CatalogRow:
    """A catalog row of some other model, as an earlier run left it."""
    return CatalogRow(
        model="other", revision="v1", base="b", method="truncsvd", rank=1, extra_rank=0, allocation="uniform",
        budget_bits=1, paper_bits=1, bytes=1, metric="accuracy", eval_data="", uri="u", sha256="0" * 64,
        artifact_id=artifact_id,
    )


def test_flow_deltas_match_the_single_process_path(fleet_runtime, synthetic_pair, store_uri, tmp_path):
    base, tuned = synthetic_pair
    base_uri, tuned_uri = inputs_on(store_uri, base, tuned)
    model = ModelSpec(f"syn-{uuid.uuid4().hex[:6]}", base_uri, tuned_uri)
    sweep = SweepSpec(ranks=(1,), methods=("truncsvd", "magtruncsvd"), group_mib=SMALL_GROUPS / MIB)
    catalog = Catalog(open_store(store_uri))
    for number in range(COMPACT_AFTER_FILES + 1):  # earlier runs' files: this run compacts them
        catalog.append([other_row(f"earlier-{number}")])
    rows = main_rows(model, sweep, store_uri)
    assert [(r.method, r.status) for r in rows] == [("truncsvd", "ok"), ("magtruncsvd", "ok")]
    assert catalog.file_count() == 1 and len(catalog.rows()) == COMPACT_AFTER_FILES + 3
    for row, variant in zip(rows, sweep.variants(), strict=True):
        delta = fetched(store_uri, row, tmp_path / f"{row.method}-delta")
        manifest = DeltaArtifact.open(delta, expected_sha256=row.sha256).manifest
        assert manifest.allocation == "uniform" and len(manifest.payloads) > 2
        assert row.params_dict["compress_tasks"] == len(manifest.payloads) and row.params_dict["compress_seconds"] > 0
        assert row.bytes == sum(p.stat().st_size for p in delta.rglob("*") if p.is_file())
        reference = tmp_path / f"{row.method}-reference"
        compress_checkpoint(base, tuned, reference, variant.config)
        assert_same_layers(delta, reference)
        ours = weights(reconstruct_checkpoint(base, delta, tmp_path / f"{row.method}-ours"))
        theirs = weights(reconstruct_checkpoint(base, reference, tmp_path / f"{row.method}-theirs"))
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs) and ours.keys() == theirs.keys()
    assert_run_names(model.name, "compress", "L0", "truncsvd r=1 uniform")


def test_osd_on_a_real_model_from_s3_through_the_cli(
    fleet_runtime, real_pair, calibration_file, s3_server, tmp_path, capsys
):
    base, tuned = real_pair
    root = f"{s3_server}/{uuid.uuid4().hex}"
    base_uri, tuned_uri = upload(base, f"{root}/base"), upload(tuned, f"{root}/ft")
    calib_uri = upload(calibration_file.parent, f"{root}/data") + "/" + calibration_file.name
    store_uri = f"{root}/store"
    code = main(
        [
            "run",
            "--model",
            "minilm",
            "--base",
            base_uri,
            "--finetuned",
            tuned_uri,
            "--ranks",
            "1",
            "--methods",
            "osd",
            "--extra-rank",
            "2",
            "--calibration",
            calib_uri,
            "--eval",
            calib_uri,
            "--store",
            store_uri,
            "--json",
        ]
    )
    out, _ = capsys.readouterr()
    assert code == 0
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["status"] == "ok" and 0 <= row["accuracy"] <= 1 and row["params"]["eval_rows"] == 8
    assert row["paper_bits"] <= row["budget_bits"] and row["uri"].startswith("s3://")
    full = row["params"]["finetuned_accuracy"]  # the fine-tune itself, scored on the same rows
    assert 0 < full <= 1

    table, plot = published_report("minilm")
    (record,) = table
    assert record["uri"] == row["uri"] and record["new"] is True and record["artifact"] == row["artifact_id"][:12]
    assert record["of_full"] == round(row["accuracy"] / full, 4)
    assert S3_SECRET not in json.dumps(table) + plot
    png = open_store(store_uri).get_bytes("reports/minilm/accuracy-vs-size.png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and f"data:image/png;base64,{base64.b64encode(png).decode()})" in plot
    assert f"`{store_uri}/reports/minilm/accuracy-vs-size.png`" in plot

    gradients = open_store(store_uri)
    (key,) = [k for k in gradients.list("gradients/")]
    gradients.get_file(key, tmp_path / "g.safetensors")
    config = CompressionConfig(method="osd", rank=1, extra_rank=2)
    with torch_threads(1):  # as in a Ray worker with one CPU: BLAS results depend on the thread count
        compress_checkpoint(
            base, tuned, tmp_path / "reference", config, gradients=GradientFile(tmp_path / "g.safetensors")
        )
    reference = weights(reconstruct_checkpoint(base, tmp_path / "reference", tmp_path / "theirs"))

    code = main(["catalog", "smallest", "--store", store_uri, "--model", "minilm", "--min-accuracy", "0", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["sha256"] == row["sha256"]
    code = main(
        [
            "fetch",
            "--store",
            store_uri,
            "--model",
            "minilm",
            "--min-accuracy",
            "0",
            "--base",
            str(base),
            "--out",
            str(tmp_path / "fetched"),
        ]
    )
    assert code == 0 and str(tmp_path / "fetched") in capsys.readouterr().out
    restored = weights(tmp_path / "fetched")
    assert restored.keys() == reference.keys()
    assert all(torch.equal(restored[name], reference[name]) for name in reference)
    assert json.loads((tmp_path / "fetched" / "config.json").read_text())["id2label"] == {"0": "rotten", "1": "fresh"}

    fetch_adapter = ["fetch", "--store", store_uri, "--model", "minilm", "--min-accuracy", "0", "--base", str(base),
                     "--out", str(tmp_path / "adapter"), "--format", "peft", "--dtype", "float32"]
    assert main(fetch_adapter) == 0 and "peft LoRA adapter" in capsys.readouterr().out
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    batch = AutoTokenizer.from_pretrained(base)(["a moving film", "dull and long"], return_tensors="pt", padding=True)
    served = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base),
                                            tmp_path / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "fetched").eval()
    with torch.no_grad():
        assert torch.allclose(served(**batch).logits, merged(**batch).logits, atol=1e-4)

    code = main(["catalog", "smallest", "--store", store_uri, "--model", "minilm", "--min-accuracy", "1.01"])
    assert code == 1 and "none of 1 artifacts of model 'minilm' meets accuracy >= 1.01" in capsys.readouterr().err


def test_rerun_adds_no_rows_and_list_prints_one_object_per_row(fleet_runtime, synthetic_pair, tmp_path, capsys):
    base, tuned = synthetic_pair
    store = tmp_path / "store"
    (tmp_path / "fleet.json").write_text(
        json.dumps(
            {
                "store": str(store),
                "sweep": {"ranks": [1, 2], "methods": ["truncsvd"], "group_mib": 0.05},
                "models": [
                    {"name": "a", "base": str(base), "finetuned": str(tuned)},
                    {"name": "b", "base": str(base), "finetuned": str(tuned)},
                ],
            }
        )
    )
    assert main(["run-fleet", str(tmp_path / "fleet.json")]) == 0
    capsys.readouterr()
    version = Catalog(open_store(str(store))).version()
    objects = {key: (store / key).stat().st_mtime_ns for key in open_store(str(store)).list("artifacts/")}
    assert main(["run-fleet", str(tmp_path / "fleet.json")]) == 0
    capsys.readouterr()
    assert Catalog(open_store(str(store))).version() == version  # no catalog commit
    assert {key: (store / key).stat().st_mtime_ns for key in open_store(str(store)).list("artifacts/")} == objects
    assert main(["catalog", "list", "--store", str(store), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted((r["model"], r["rank"]) for r in listed) == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert all(r["accuracy"] is None and r["status"] == "ok" for r in listed)

    shutil.rmtree(store / "catalog")  # committed deltas without their rows (a crash between commit and catalog)
    assert main(["run-fleet", str(tmp_path / "fleet.json"), "--json"]) == 0
    relisted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # catalogued again from the existing manifests, not recompressed
    assert sorted(r["sha256"] for r in relisted) == sorted(r["sha256"] for r in listed)
    assert {key: (store / key).stat().st_mtime_ns for key in open_store(str(store)).list("artifacts/")} == objects


def test_orphan_payloads_are_overwritten_and_bad_inputs_fail_their_rows(fleet_runtime, synthetic_pair, tmp_path):
    base, tuned = synthetic_pair
    sweep = SweepSpec(ranks=(1,), methods=("truncsvd",), group_mib=SMALL_GROUPS / MIB)
    config = sweep.variants()[0].config
    prefix = artifact_prefix("orphans", delta_id(PairLayout.read(str(base), str(tuned)), config, "uniform", None))
    store = open_store(str(tmp_path / "store"))
    store.put_bytes(f"{prefix}/payload-00000.safetensors", b"left by a crashed run")
    (row,) = main_rows(ModelSpec("orphans", str(base), str(tuned)), sweep, str(tmp_path / "store"))
    assert row.status == "ok"
    DeltaArtifact.open(fetched(str(tmp_path / "store"), row, tmp_path / "delta"))  # checksums verified

    state = load_file(tuned / "model.safetensors")
    state["bert.encoder.layer.1.attention.self.value.weight"][3, 3] = float("nan")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((tuned / "config.json").read_bytes())
    save_file(state, str(broken / "model.safetensors"))
    (row,) = main_rows(ModelSpec("broken", str(base), str(broken)), sweep, str(tmp_path / "store"))
    assert row.status == "failed" and row.uri == "" and row.bytes == 0
    assert "attention.self.value.weight' contains 1 NaN" in row.params_dict["error"]
    with pytest.raises(NoneMeetsError, match="no successful artifacts of model 'broken' in the catalog \\(1 failed\\)"):
        Catalog(store).smallest("broken", 0.0)
    assert not store.exists(f"{row.params_dict['prefix']}/manifest.json")


def test_global_allocation_keeps_the_total_and_beats_uniform(fleet_runtime, tmp_path):
    base_state = write_bert_like(tmp_path / "base", layers=2, hidden=32, intermediate=64, vocab=50, seed=0)
    tuned_state = write_bert_like(
        tmp_path / "ft", layers=2, hidden=32, intermediate=64, vocab=50, seed=1, base=base_state
    )
    frozen = [n for n in base_state if n.startswith("bert.encoder.layer.0.") or "embeddings" in n]
    save_file(
        {n: base_state[n] if n in frozen else t for n, t in tuned_state.items()},
        str(tmp_path / "ft" / "model.safetensors"),
    )
    sweep = SweepSpec(  # truncsvd at r = 1 only; magtruncsvd at half a rank-1 budget too
        ranks=(0.5, 1), methods=("truncsvd", "magtruncsvd"), allocations=("uniform", "global"),
        group_mib=SMALL_GROUPS / MIB,
    )
    rows = main_rows(ModelSpec("alloc", str(tmp_path / "base"), str(tmp_path / "ft")), sweep, str(tmp_path / "store"))
    assert [(row.method, row.rank) for row in rows[::2]] == [("truncsvd", 1), ("magtruncsvd", 0.5), ("magtruncsvd", 1)]
    tuned = weights(tmp_path / "ft")
    layout = PairLayout.read(str(tmp_path / "base"), str(tmp_path / "ft"))
    for uniform, glob in zip(rows[::2], rows[1::2], strict=True):
        assert (uniform.allocation, glob.allocation, glob.status) == ("uniform", "global", "ok")
        uniform_total = plan_model("alloc", layout, CompressionConfig(method=glob.method, rank=glob.rank)).total_bits
        damage = {}
        for row in (uniform, glob):
            delta = fetched(str(tmp_path / "store"), row, tmp_path / row.artifact_id)
            manifest = DeltaArtifact.open(delta).manifest
            assert manifest.allocation == row.allocation and manifest.totals["budget_bits"] <= uniform_total
            rebuilt = weights(reconstruct_checkpoint(tmp_path / "base", delta, tmp_path / f"{row.artifact_id}-model"))
            damage[row.allocation] = sum(
                float(((rebuilt[n] - tuned[n]) ** 2).sum())
                for n in manifest.layers
                if manifest.layers[n].kind in ("factored", "zero") and n not in frozen
            )
        layers = DeltaArtifact.open(tmp_path / glob.artifact_id).manifest.layers
        assert all(layers[n].budget_bits == 0 for n in frozen if n in layers and layers[n].budget_bits is not None)
        assert damage["global"] < 0.8 * damage["uniform"], (glob.method, damage)


def test_a_global_all_allocation_in_the_flow_matches_the_single_process_path(fleet_runtime, synthetic_pair, tmp_path):
    """Workers measure the 1-D deltas too, the flow spends one total on them, and the delta is compress_checkpoint's."""
    base, tuned = synthetic_pair
    store = str(tmp_path / "store")
    sweep = SweepSpec(ranks=(0.5,), methods=("magtruncsvd",), allocations=("global-all",), group_mib=SMALL_GROUPS / MIB)
    (row,) = main_rows(ModelSpec("all", str(base), str(tuned)), sweep, store)
    assert (row.allocation, row.status) == ("global-all", "ok")
    delta = fetched(store, row, tmp_path / "delta")
    reference = tmp_path / "reference"
    compress_checkpoint(base, tuned, reference, sweep.variants()[0].config, allocation="global-all")
    assert_same_layers(delta, reference)
    layers = DeltaArtifact.open(delta).manifest.layers
    vectors = [layers[n] for n in layers if len(layers[n].shape) == 1]
    assert vectors and all(layer.budget_bits is not None for layer in vectors)
    uniform_total = plan_model("all", PairLayout.read(str(base), str(tuned)), sweep.variants()[0].config).total_bits
    assert row.budget_bits == sum(layer.budget_bits or 0 for layer in layers.values()) <= uniform_total


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_a_decoder_pair_through_the_flow_scored_by_log_likelihood_and_perplexity(
    fleet_runtime, lm_pair, store_uri, tmp_path, capsys
):
    base, tuned = lm_pair
    base_uri, tuned_uri = inputs_on(store_uri, base, tuned)
    sweep = SweepSpec(ranks=(1, 2), methods=("magtruncsvd",))
    for metric, rows, direction in (("acc", CHOICES, True), ("perplexity", TEXTS, False)):
        data = write_rows(tmp_path / f"{metric}.jsonl", rows)
        name = f"lm-{metric}-{uuid.uuid4().hex[:6]}"
        found = main_rows(ModelSpec(name, base_uri, tuned_uri, eval=str(data)), sweep, store_uri)
        assert [(r.status, r.metric, r.higher_is_better) for r in found] == [("ok", metric, direction)] * 2
        assert all(r.accuracy is not None and "finetuned_accuracy" in r.params_dict for r in found)
    ceiling = max(r.accuracy for r in found)
    code = main(["catalog", "smallest", "--store", store_uri, "--model", name, "--at-most", str(ceiling), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["metric"] == "perplexity"
    code = main(["catalog", "smallest", "--store", store_uri, "--model", name, "--min-accuracy", "0.5"])
    assert code == 2 and "perplexity of model" in capsys.readouterr().err


def main_rows(model: ModelSpec, sweep: SweepSpec, store_uri: str):
    from flows.pipeline import run_model

    return run_model(model, sweep, store_uri)


def published_report(model: str, timeout: float = 20.0) -> tuple[list[dict], str]:
    """The newest table (decoded rows) and plot (markdown) artifacts of ``model`` as the server stores them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.report import artifact_key

    found = {}
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        for kind in ("osd-fleet-rows", "osd-fleet-plot"):
            wanted = ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(kind, model)]))
            while not (artifacts := client.read_artifacts(artifact_filter=wanted, sort=ArtifactSort.CREATED_DESC)):
                assert time.monotonic() < deadline, f"no {kind} artifact of {model} in {timeout:g} s"
                time.sleep(0.5)
            found[kind] = artifacts[0]
    table, plot = found["osd-fleet-rows"], found["osd-fleet-plot"]
    assert (table.type, plot.type) == ("table", "markdown") and table.flow_run_id == plot.flow_run_id
    return json.loads(table.data), plot.data


def assert_run_names(model: str, verb: str, group: str, variant: str) -> None:
    """Flow and task runs recorded by the session's server say model, layer group and budget."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName, TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        assert client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"compress {model}"])))
        by_model = TaskRunFilter(name=TaskRunFilterName(like_=model))
        deadline = time.monotonic() + 20  # task runs reach the database through the server's event pipeline
        while True:
            names = [run.name for run in client.read_task_runs(task_run_filter=by_model, limit=200)]
            if (
                any(n.startswith(f"{verb} {model} {group}") and n.endswith(variant) for n in names)
                or time.monotonic() > deadline
            ):
                break
            time.sleep(0.5)
    assert any(n.startswith(f"{verb} {model} {group}") and n.endswith(variant) for n in names), names
