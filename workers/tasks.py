"""The worker functions as Prefect tasks, and the Ray resources each one declares.

prefect-ray's ``RayTaskRunner`` runs each submitted task as a Ray task named after the Prefect
task, so :func:`submit` renames the task per job ("compress tiny L0-1 osd r=1+2 uniform"): the
Prefect UI and the Ray dashboard then both say which model, layer group and budget is running.
Resources are declared, not guessed at run time: one CPU, a GPU when the cluster has one, and
memory sized from the work, so Ray (not sleeps or locks) limits how many run at once.

Retries are for I/O only: a task is retried when storage was unreachable, never for a
deterministic failure of the math or the inputs. A worker process that dies mid-task (killed,
out of memory, its node lost) is a system failure, which Ray retries up to
``WORKER_LOST_RETRIES`` times: every task is idempotent (same job, same payload key, same bytes),
so a retry after a half-done attempt gives the delta an undisturbed run gives
(``tests/test_faults.py``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

import ray
from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.futures import PrefectFuture
from prefect.states import State
from prefect_ray.context import remote_options

from osd_io.storage import EndpointUnreachableError
from workers.calibrate import calibrate
from workers.compress import compress_group, measure_group
from workers.evaluate import evaluate
from workers.jobs import CalibrationJob, EvalJob, EvalRecord, GroupJob, GroupResult, LayerCurve

R = TypeVar("R")
GIB = 1 << 30
WORKER_LOST_RETRIES = 3  # Ray's default for tasks, declared where the pipeline relies on it


def _storage_unreachable(task: Task[..., Any], run: TaskRun, state: State[Any]) -> bool:
    try:
        state.result()
    except EndpointUnreachableError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is deterministic: do not retry
        return False
    return False


_IO_RETRIES: dict[str, Any] = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=_storage_unreachable)
_NO_RESULTS: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="compress-group", task_run_name="compress {job.name}", **_IO_RETRIES, **_NO_RESULTS)
def compress_group_task(job: GroupJob, calibration: str | None = None) -> GroupResult:
    result = compress_group(job, calibration)
    return replace(result, node=ray.get_runtime_context().get_node_id()) if ray.is_initialized() else result


@task(name="measure-group", task_run_name="measure {job.name}", **_IO_RETRIES, **_NO_RESULTS)
def measure_group_task(job: GroupJob, calibration: str | None = None) -> tuple[LayerCurve, ...]:
    return measure_group(job, calibration)


@task(name="calibrate", task_run_name="calibrate {job.name}", **_IO_RETRIES, **_NO_RESULTS)
def calibrate_task(job: CalibrationJob) -> str:
    return calibrate(job)


@task(name="evaluate", task_run_name="evaluate {job.name}", **_IO_RETRIES, **_NO_RESULTS)
def evaluate_task(job: EvalJob) -> EvalRecord:
    return evaluate(job)


def submit(
    task_: Task[..., R], job: GroupJob | CalibrationJob | EvalJob, *, gpus: float, memory_cap: int, **inputs: Any
) -> PrefectFuture[R]:
    """Submit ``task_`` for ``job`` to the flow's task runner with its run name and Ray resources.

    ``memory_cap`` (the cluster's memory) keeps an estimate above it from making a task
    unschedulable: Ray would wait for a node that never comes.
    """
    name = str(task_.task_run_name).format(job=job)
    with remote_options(
        num_cpus=1, num_gpus=gpus, memory=min(memory_for(job), memory_cap), max_retries=WORKER_LOST_RETRIES
    ):
        return task_.with_options(name=name).submit(job, **inputs)


def memory_for(job: GroupJob | CalibrationJob | EvalJob) -> int:
    """Bytes of memory a task may need: the libraries, plus a few copies of its largest tensors.

    A group worker holds one fine-tune/base pair, the float32 delta, factors and a residual at a
    time; calibration and evaluation hold a whole model with activations and gradients.
    """
    if isinstance(job, GroupJob):
        return GIB + 6 * job.group.largest_bytes
    model_bytes = sum(4 * ref.numel for ref in job.pair.finetuned.tensors.values())
    return 2 * GIB + (4 if isinstance(job, CalibrationJob) else 3) * model_bytes
