"""The fleet pipeline as Prefect flows whose tasks run on Ray.

``compress_model(model, sweep, store)`` takes one model through every variant of a sweep
(method × budget rank × allocation):

1. plan, in the flow: the pair's headers and content hashes; every variant's plan, delta id and
   artifact id. Variants whose artifact id is in the catalog with status ok are skipped.
2. calibrate, one Ray task per model (and gradient point): gradients into the store.
3. compress, one Ray task per layer group. A global allocation first measures every group
   (phase 1), allocates the model's bits in the flow, then compresses with per-layer budgets.
4. commit, in the flow: payloads verified, side files, then the manifest (``osd_io.artifacts``).
5. evaluate, one Ray task per delta: reconstruct on the base, score on the eval rows.
6. catalog, in the flow: one row per delta, appended after its manifest exists.
7. report, in the flow: the run's rows as a table artifact and the model's accuracy-versus-size
   plot (``flows.report``), stored next to the catalog and embedded in a markdown artifact.

With eval data the fine-tune itself is scored too (one more evaluation task), so rows record the
reference their accuracy is a fraction of (``params["finetuned_accuracy"]``).

Every variant's work is submitted before any result is awaited, so Ray keeps all workers busy
across variants; the flow blocks only where it needs a result (allocation, commit, catalog).
A variant that fails gets a catalog row with status "failed" and the error while the others go
on; a rerun retries it, since only ok rows are skipped.

``compress_fleet(fleet)`` runs ``compress_model`` for each model of a fleet file.
``run_model`` and ``run_fleet`` start the runtime once (``flows.runtime``) and call the flows:
the entry points of the CLI, the demo, the benchmark and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect_ray import RayTaskRunner

from flows.fleet_config import FleetConfig, ModelSpec, SweepSpec, Variant, check_calibration
from flows.plan import (
    LayerGroup,
    ModelPlan,
    artifact_id,
    artifact_prefix,
    delta_id,
    gradient_key,
    plan_model,
)
from flows.report import (
    ReportError,
    artifact_key,
    comparable_rows,
    finetuned_accuracy,
    plot_key,
    plot_png,
    report_markdown,
    table_records,
)
from flows.runtime import start_runtime
from osd_core.allocate import Allocation, spend_globally
from osd_core.checkpoint import side_files
from osd_core.compress import beside_budgets
from osd_core.config import GLOBAL_ALLOCATIONS
from osd_core.errors import OSDError
from osd_core.outputs import scratch_dir
from osd_io.artifacts import CommittedDelta, commit_delta, read_commit
from osd_io.catalog import COMPACT_AFTER_FILES, Catalog, CatalogRow
from osd_io.sources import PairLayout, fetch_file, open_checkpoint, sha256_of
from osd_io.storage import ObjectStore, open_store
from workers.jobs import CalibrationJob, EvalJob, EvalRecord, GroupJob, GroupResult
from workers.tasks import calibrate_task, compress_group_task, evaluate_task, measure_group_task, submit
from workloads.task_rows import HIGHER_IS_BETTER, TaskRows, metric_for, read_rows_for

_IN_FLOW: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)


@dataclass(frozen=True)
class ModelInputs:
    """A model's inputs as identified at plan time: the pair's layout and the data files' hashes."""

    pair: PairLayout
    calibration_sha256: str | None
    eval_sha256: str | None
    revision: str
    metric: str  # what the eval rows measure on this model (accuracy, acc or perplexity)


@dataclass(frozen=True)
class Target:
    """One variant of one model, planned: where its delta goes and what identifies it."""

    variant: Variant
    plan: ModelPlan
    delta_id: str
    artifact_id: str
    prefix: str
    gradient_key: str | None


@task(name="plan", task_run_name="plan {model.name}", **_IN_FLOW)
def read_inputs(model: ModelSpec) -> ModelInputs:
    """Headers and content hashes of the pair, hashes of the calibration and eval files, and the metric."""
    pair = PairLayout.read(model.base, model.finetuned)
    metric = "accuracy"
    if model.eval:
        with scratch_dir("plan") as scratch:
            metric = metric_for(pair.finetuned.config, task_rows(model.eval, pair.finetuned.config, Path(scratch)))
    return ModelInputs(
        pair,
        sha256_of(model.calibration) if model.calibration else None,
        sha256_of(model.eval) if model.eval else None,
        model.revision or pair.finetuned_identity["sha256"][:12],
        metric,
    )


def task_rows(uri: str, config: dict[str, Any], scratch: Path) -> TaskRows:
    """The data file at ``uri``, checked against the model of ``config`` (its classes, its task)."""
    return read_rows_for(fetch_file(uri, scratch), config)


def make_target(model: ModelSpec, inputs: ModelInputs, variant: Variant, group_bytes: int) -> Target:
    plan = plan_model(model.name, inputs.pair, variant.config, group_bytes=group_bytes)
    delta = delta_id(inputs.pair, variant.config, variant.allocation, inputs.calibration_sha256)
    grads = None
    if variant.config.needs_gradients and inputs.calibration_sha256 is not None:
        names = [layer.name for layer in plan.factorised]
        grads = gradient_key(model.name, inputs.pair, variant.config, inputs.calibration_sha256, names)
    ident = artifact_id(model.name, delta, inputs.eval_sha256, inputs.metric)
    return Target(variant, plan, delta, ident, artifact_prefix(model.name, delta), grads)


@task(name="commit", task_run_name="commit {model.name} {target.variant.label}", **_IN_FLOW)
def commit_task(
    model: ModelSpec,
    inputs: ModelInputs,
    target: Target,
    results: list[GroupResult],
    files: dict[str, bytes],
    store: str,
    allocation: Allocation | None,
) -> CommittedDelta:
    """Write the manifest that makes the workers' payloads one delta (the commit)."""
    provenance: dict[str, Any] = {
        "model": model.name,
        "delta_id": target.delta_id,
        "groups": len(results),
        "calibration_sha256": inputs.calibration_sha256,
    }
    if allocation is not None:
        provenance["global_allocation"] = {
            "bits": allocation.bits,
            "total_bits": target.plan.total_bits,
            "estimated_damage": allocation.cost,
        }
    return commit_delta(
        open_store(store),
        target.prefix,
        results,
        files,
        config=target.variant.config.to_dict(),
        base=inputs.pair.base_identity,
        finetuned=inputs.pair.finetuned_identity,
        unknown_tensors=list(target.plan.unknown),
        allocation=target.variant.allocation,
        provenance=provenance,
    )


@flow(
    name="compress-model",
    flow_run_name="compress {model.name}",
    task_runner=RayTaskRunner(),
    validate_parameters=True,
    persist_result=False,
)
def compress_model(model: ModelSpec, sweep: SweepSpec, store: str) -> tuple[CatalogRow, ...]:
    """Compress, evaluate and catalogue every variant of ``sweep`` for ``model``; rows in variant order."""
    check_calibration((model,), sweep)
    return _Sweep(model, sweep, store).run()


@flow(
    name="compress-fleet",
    flow_run_name="fleet: {fleet.label}",
    task_runner=RayTaskRunner(),
    validate_parameters=True,
    persist_result=False,
)
def compress_fleet(fleet: FleetConfig) -> tuple[CatalogRow, ...]:
    """``compress_model`` for each model of the fleet, one after another (each fills all workers)."""
    rows: list[CatalogRow] = []
    for model in fleet.models:
        rows.extend(compress_model(model, fleet.sweep, fleet.store))
    return tuple(rows)


def run_model(model: ModelSpec, sweep: SweepSpec, store: str, **runtime: Any) -> tuple[CatalogRow, ...]:
    """Start the runtime if this process has none (``flows.runtime.start_runtime(**runtime)``), run one model."""
    preflight((model,), sweep, store)
    start_runtime(**runtime)
    return compress_model(model, sweep, store)


def run_fleet(fleet: FleetConfig, **runtime: Any) -> tuple[CatalogRow, ...]:
    preflight(fleet.models, fleet.sweep, fleet.store)
    start_runtime(**runtime)
    return compress_fleet(fleet)


def preflight(models: Sequence[ModelSpec], sweep: SweepSpec, store: str) -> None:
    """Check all that needs neither Prefect nor Ray, before either starts.

    A budget no matrix can hold, a bad store URI, or eval labels outside the model's classes
    used to surface only after the servers had started and compression had run (43–57 s). This
    reads headers, configuration and the data files; it hashes no weights.
    """
    check_calibration(tuple(models), sweep)
    open_store(store)
    for model in models:
        base, finetuned = open_checkpoint(model.base), open_checkpoint(model.finetuned)
        pair = PairLayout(base, finetuned, {}, {})
        for variant in sweep.variants():
            plan_model(model.name, pair, variant.config, group_bytes=sweep.group_bytes())
        with scratch_dir("preflight") as scratch:
            for uri in filter(None, (model.calibration, model.eval)):
                task_rows(uri, finetuned.config, Path(scratch))


class _Sweep:
    """The bookkeeping of one ``compress_model`` run: futures and outcomes by artifact id."""

    def __init__(self, model: ModelSpec, sweep: SweepSpec, store: str):
        import ray

        self.model, self.sweep, self.store_uri = model, sweep, store
        self.store: ObjectStore = open_store(store)
        self.log = get_run_logger()
        resources = ray.cluster_resources()
        # Group tasks take a GPU where the cluster has one (their math runs there); calibration and
        # evaluation run their model on the CPU and take none.
        self.gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        self.memory_cap = int(resources.get("memory", 8 << 30))
        self.failures: dict[str, BaseException] = {}
        self.work: dict[str, tuple[int, float]] = {}  # artifact id -> (layer-group tasks, their seconds in all)
        self.reference: PrefectFuture[EvalRecord] | None = None
        self.inputs = read_inputs(model)

    def run(self) -> tuple[CatalogRow, ...]:
        group_bytes = self.sweep.group_bytes(gpu=self.gpus > 0)
        targets = [make_target(self.model, self.inputs, v, group_bytes) for v in self.sweep.variants()]
        catalog = Catalog(self.store)
        done = {row.artifact_id: row for row in catalog.rows(self.model.name) if row.status == "ok"}
        todo = [t for t in targets if t.artifact_id not in done]
        for name in targets[0].plan.unknown:
            self.log.warning(
                "%s: tensor %r matches no rule of its architecture policy; stored dense", self.model.name, name
            )
        self.log.info(
            "%s: %d variants (%d already in the catalog), %d layer groups each; %s GPU per task",
            self.model.name,
            len(targets),
            len(targets) - len(todo),
            len(targets[0].plan.groups),
            self.gpus,
        )
        committed = {t.artifact_id: read_commit(self.store, t.prefix) for t in todo}
        pending = [t for t in todo if committed[t.artifact_id] is None]
        calibrations = self._calibrate(pending)
        staged = {t.artifact_id: self._stage(t, calibrations.get(t.gradient_key)) for t in pending}
        allocations = {
            t.artifact_id: self._allocate(t, staged, calibrations.get(t.gradient_key))
            for t in pending
            if t.variant.allocation in GLOBAL_ALLOCATIONS
        }
        evaluations: dict[str, PrefectFuture[EvalRecord]] = {}
        if todo and self.model.eval is not None:
            self.reference = self._evaluate_finetuned()
        for t in todo:
            commit = committed[t.artifact_id] or self._commit(
                t, staged.get(t.artifact_id), allocations.get(t.artifact_id)
            )
            committed[t.artifact_id] = commit
            if commit is not None and self.model.eval is not None:
                evaluations[t.artifact_id] = self._evaluate(t, commit)
        rows = dict(done)
        for number, t in enumerate(todo, start=1):
            row = self._row(t, committed[t.artifact_id], evaluations.get(t.artifact_id))
            catalog.append([row])
            rows[t.artifact_id] = row
            outcome = f"accuracy {row.accuracy:.4f}" if row.accuracy is not None else row.status
            self.log.info(
                "[%d/%d] %s %s: %s, %s bytes",
                number,
                len(todo),
                self.model.name,
                t.variant.label,
                outcome,
                f"{row.bytes:,}",
            )
        ordered = tuple(rows[t.artifact_id] for t in targets)
        if todo:
            self._compact(catalog)
        self._publish(ordered, {t.artifact_id for t in todo}, catalog)
        return ordered

    def _compact(self, catalog: Catalog) -> None:
        """Compact the catalog table once it passes the threshold of files, so reads stay a few GETs.

        The rows are already written: a failure here warns and changes no outcome.
        """
        try:
            done = catalog.compact(min_files=COMPACT_AFTER_FILES + 1)
        except (OSDError, OSError) as exc:
            self.log.warning("catalog compaction failed (%s); the next run tries again", exc)
            return
        if done is not None:
            self.log.info("catalog compacted: %d files into %d, %d vacuumed", done.files_before, done.files_after,
                          done.vacuumed)

    def _publish(self, rows: Sequence[CatalogRow], new: set[str], catalog: Catalog) -> None:
        """Table and plot artifacts for the Prefect UI; the PNG also goes to the store next to the catalog.

        The plot only when this run added rows: a rerun that compressed nothing writes nothing to the
        store. A view of the catalog, which is already written: a failure here warns and changes no outcome.
        """
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        name = self.model.name
        try:
            create_table_artifact(
                table_records(rows, new=new, reference=self.finetuned_accuracy),
                key=artifact_key("osd-fleet-rows", name),
                description=f"Catalog rows of {name} for this run's sweep (new: compressed by this run).",
            )
            if not new:
                return
            plot = artifact_key("osd-fleet-plot", name)
            try:
                comparable = comparable_rows(catalog.rows(name), name)
            except ReportError as exc:
                create_markdown_artifact(f"### {name}: no plot\n\n{exc}", key=plot)
                return
            reference = finetuned_accuracy(comparable)
            png = plot_png(comparable, reference=reference)
            self.store.put_bytes(plot_key(name), png)
            markdown = report_markdown(
                comparable, png, plot_uri=self.store.uri_for(plot_key(name)), store_uri=self.store_uri,
                reference=reference,
            )
            create_markdown_artifact(markdown, key=plot, description=f"Accuracy versus size of {name}'s deltas.")
        except Exception as exc:  # noqa: BLE001 - a report must not fail a run whose catalog rows are written
            self.log.warning("%s: publishing the report failed: %s: %s", name, type(exc).__name__, exc)

    def _calibrate(self, targets: Sequence[Target]) -> dict[str | None, PrefectFuture[str]]:
        """One calibration task per distinct gradient key (normally one per model)."""
        futures: dict[str | None, PrefectFuture[str]] = {}
        for t in targets:
            key = t.gradient_key
            if key is None or key in futures:
                continue
            job = CalibrationJob(
                self.model.name, self.inputs.pair, self.model.calibration or "", t.variant.config, self.store_uri, key
            )
            futures[key] = submit(calibrate_task, job, gpus=0, memory_cap=self.memory_cap)
        return futures

    def _stage(self, t: Target, calibration: PrefectFuture[str] | None) -> list[PrefectFuture[Any]]:
        """Phase 1 (measure, global allocation) or the only phase (compress, uniform), per group."""
        task_ = measure_group_task if t.variant.allocation in GLOBAL_ALLOCATIONS else compress_group_task
        return [
            submit(task_, self._job(t, group), gpus=self.gpus, memory_cap=self.memory_cap, calibration=calibration)
            for group in t.plan.groups
        ]

    def _allocate(
        self, t: Target, staged: dict[str, list[PrefectFuture[Any]]], calibration: PrefectFuture[str] | None
    ) -> Allocation | None:
        """Gather the curves, spend the model's bits, and replace the measurements by phase 2."""
        measurements = staged.pop(t.artifact_id)
        try:
            curves = {curve.name: curve.options for future in measurements for curve in future.result()}
            plans = [layer.plan for group in t.plan.groups for layer in group.layers]
            beside = beside_budgets(plans, t.variant.config, t.variant.allocation)
            allocation, uniform_cost = spend_globally(curves, t.plan.budgets, beside)
        except Exception as exc:  # noqa: BLE001 - recorded as this variant's failure
            self._fail(t, exc)
            return None
        self.log.info(
            "%s %s: allocated %s of %s bits; estimated damage %.4g (uniform: %.4g)",
            self.model.name,
            t.variant.label,
            f"{allocation.bits:,}",
            f"{t.plan.total_bits:,}",
            allocation.cost,
            uniform_cost,
        )
        budgets = tuple(allocation.budgets.items())
        staged[t.artifact_id] = [
            submit(
                compress_group_task,
                self._job(t, group, budgets),
                gpus=self.gpus,
                memory_cap=self.memory_cap,
                calibration=calibration,
            )
            for group in t.plan.groups
        ]
        return allocation

    def _commit(
        self, t: Target, futures: list[PrefectFuture[GroupResult]] | None, allocation: Allocation | None
    ) -> CommittedDelta | None:
        if futures is None or t.artifact_id in self.failures:
            return None
        try:
            results = [future.result() for future in futures]
            commit = commit_task(self.model, self.inputs, t, results, self.side_files, self.store_uri, allocation)
        except Exception as exc:  # noqa: BLE001 - recorded as this variant's failure
            self._fail(t, exc)
            return None
        devices = ", ".join(sorted({result.device for result in results}))
        nodes = len({result.node for result in results})
        seconds = sum(result.seconds for result in results)
        self.work[t.artifact_id] = (len(results), seconds)
        self.log.info(
            "%s %s: committed %s (%d groups, %.1f s on %s, %d Ray node%s)",
            self.model.name,
            t.variant.label,
            commit.uri,
            len(results),
            seconds,
            devices,
            nodes,
            "" if nodes == 1 else "s",
        )
        return commit

    def _evaluate_finetuned(self) -> PrefectFuture[EvalRecord]:
        """Score the fine-tune itself on the eval rows: the reference of each delta's "of full"."""
        job = EvalJob(self.model.name, "fine-tune", self.inputs.pair, self.store_uri, None, None, self.model.eval or "")
        return submit(evaluate_task, job, gpus=0, memory_cap=self.memory_cap)

    @cached_property
    def finetuned_accuracy(self) -> float | None:
        """The fine-tune's own accuracy this run measured; None without eval data or when scoring it failed."""
        if self.reference is None:
            return None
        try:
            return self.reference.result().value
        except Exception as exc:  # noqa: BLE001 - the deltas' rows stand without their reference
            self.log.warning(
                "%s: scoring the fine-tune itself failed: %s: %s", self.model.name, type(exc).__name__, exc
            )
            return None

    def _evaluate(self, t: Target, commit: CommittedDelta) -> PrefectFuture[EvalRecord]:
        job = EvalJob(
            self.model.name,
            t.variant.label,
            self.inputs.pair,
            self.store_uri,
            t.prefix,
            commit.manifest_sha256,
            self.model.eval or "",
        )
        return submit(evaluate_task, job, gpus=0, memory_cap=self.memory_cap)

    def _row(
        self, t: Target, commit: CommittedDelta | None, evaluation: PrefectFuture[EvalRecord] | None
    ) -> CatalogRow:
        record = None
        if evaluation is not None:
            try:
                record = evaluation.result()
            except Exception as exc:  # noqa: BLE001 - the delta stays; its row says evaluation failed
                self._fail(t, exc)
        config, pair = t.variant.config, self.inputs.pair
        params: dict[str, Any] = {
            "config": config.to_dict(),
            "prefix": t.prefix,
            "delta_id": t.delta_id,
            "base_sha256": pair.base_identity["sha256"],
            "finetuned_sha256": pair.finetuned_identity["sha256"],
        }
        if t.artifact_id in self.work:
            tasks, seconds = self.work[t.artifact_id]
            params.update(compress_tasks=tasks, compress_seconds=round(seconds, 3))
        if record is not None:
            params.update(record.extra, eval_rows=record.rows, eval_seconds=round(record.seconds, 3))
            if self.finetuned_accuracy is not None:
                params["finetuned_accuracy"] = self.finetuned_accuracy
        if t.artifact_id in self.failures:
            error = self.failures[t.artifact_id]
            params["error"] = f"{type(error).__name__}: {error}"
        return CatalogRow(
            model=self.model.name,
            revision=self.inputs.revision,
            base=pair.base_identity["path"],
            method=config.method,
            rank=config.rank,
            extra_rank=config.c,
            allocation=t.variant.allocation,
            budget_bits=commit.budget_bits if commit else t.plan.total_bits,
            paper_bits=commit.paper_bits if commit else 0,
            bytes=commit.bytes if commit else 0,
            accuracy=record.value if record else None,
            metric=self.inputs.metric,
            higher_is_better=HIGHER_IS_BETTER[self.inputs.metric],
            eval_data=self.inputs.eval_sha256 or "",
            uri=commit.uri if commit else "",
            sha256=commit.manifest_sha256 if commit else "",
            artifact_id=t.artifact_id,
            status="failed" if t.artifact_id in self.failures else "ok",
            params=params,
        )

    def _job(self, t: Target, group: LayerGroup, budgets: tuple[tuple[str, int], ...] = ()) -> GroupJob:
        wanted = {layer.name for layer in group.layers}
        return GroupJob(
            self.model.name,
            t.variant.label,
            group,
            t.variant.config,
            self.store_uri,
            t.prefix,
            tuple((name, bits) for name, bits in budgets if name in wanted),
            allocation=t.variant.allocation,
        )

    def _fail(self, t: Target, exc: BaseException) -> None:
        self.failures.setdefault(t.artifact_id, exc)
        self.log.error("%s %s failed: %s: %s", self.model.name, t.variant.label, type(exc).__name__, exc)

    @cached_property
    def side_files(self) -> dict[str, bytes]:
        return side_files(self.inputs.pair.base, self.inputs.pair.finetuned)
