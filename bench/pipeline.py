"""What orchestration costs: the fleet flow against the same math in a plain loop, and 1 vs 2 workers.

    python bench/pipeline.py [--workload tiny] [--ranks 1,2,4] [--methods truncsvd,magtruncsvd] [--group-mib 32]
    python bench/pipeline.py --scale-layers 2 --ranks 16 --methods truncsvd --group-mib 32,1024

Compresses every variant (methods × budget ranks, uniform allocation, no evaluation) of one
workload, or of ``bench/scale.py``'s Llama-2-7B-shaped pair at ``--scale-layers`` layers, three
ways, each into a fresh store:

- plain loop: ``osd_core.compress.compress_checkpoint`` per variant in this process, with one
  torch thread (what one Ray worker gets) and with all cores;
- the ``compress_model`` flow on a local Ray with 1 CPU, then with 2 CPUs, each in a child
  process that joins this process's Prefect server. The first flow run in a fresh Ray is
  "cold" (workers import torch and Prefect); the second, on a new store, is "warm". Each
  ``--group-mib`` (the float32 size of one layer group, one Ray task) is run in turn.

Prints a table of wall times, throughput and the ratio to the one-thread plain loop. On a shared
machine multi-threaded torch can be slower than one thread (oversubscribed cores): both plain
rows are shown for that reason. Methods that need calibration (osd) are left out by default so
that all three do the same work.

Separate runs on a shared machine differ by ±20%, so each flow row also measures its own
orchestration, in the same run: the catalog records every delta's layer-group tasks and their
seconds in all (``compress_tasks``, ``compress_seconds``), and what the workers' wall time
(wall × workers) held beyond those seconds is the flow's own cost: starting the run, planning,
scheduling each task, the commit, the catalog and the report, and with two workers the wait
for the last task.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flows.fleet_config import DEFAULT_GROUP_BYTES, ModelSpec, SweepSpec
from osd_cli.arguments import comma_list

CHILD_FLAG = "--child"
MIB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="tiny")
    parser.add_argument("--scale-layers", type=int, help="use bench/scale.py's pair with this many layers instead")
    parser.add_argument("--pair", help=argparse.SUPPRESS)  # internal: BASE,FINETUNED directories
    parser.add_argument("--group-mib", type=comma_list(float), default=(DEFAULT_GROUP_BYTES / MIB,))
    parser.add_argument("--ranks", type=comma_list(int), default=(1, 2, 4))
    parser.add_argument("--methods", type=comma_list(str), default=("truncsvd", "magtruncsvd"))
    parser.add_argument(CHILD_FLAG, type=int, help=argparse.SUPPRESS)  # internal: run the flow with this many CPUs
    parser.add_argument("--api-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sweep = SweepSpec(ranks=args.ranks, methods=args.methods, group_mib=args.group_mib[0])
        print(json.dumps(flow_timings(pair_model(args.pair), sweep, args.child, args.api_url)))
        return
    with tempfile.TemporaryDirectory(prefix="osd-bench-pair-") as scratch:
        if args.scale_layers:
            from scale import write_pair  # bench/ is this script's directory

            name, pair = f"scale-{args.scale_layers}", write_pair(Path(scratch), args.scale_layers)
        else:
            name, pair = args.workload, workload_pair(args.workload)
        rows, sweep = measure(args, pair)
    variants = len(sweep.variants())
    print(f"\n{name}: {variants} variants ({', '.join(v.label for v in sweep.variants())})")
    one_thread = rows[0].wall
    print(f"{'setup':<52} {'wall s':>8} {'variants/s':>11} {'x plain, 1 thread':>18} {'tasks':>6} "
          f"{'in tasks s':>11} {'not in tasks':>13} {'per task s':>11}")
    for row in rows:
        print(f"{row.label:<52} {row.wall:>8.1f} {variants / row.wall:>11.3f} {row.wall / one_thread:>18.2f} "
              + ("" if row.tasks is None else
                 f"{row.tasks:>6} {row.in_tasks:>11.1f} {row.outside:>13.1%} {row.outside_per_task:>11.2f}"))
    print("\nnot in tasks: 1 − (seconds inside the layer-group tasks) / (wall × workers); per task: those "
          "seconds outside, over the tasks")


@dataclass(frozen=True)
class Row:
    """One setup's wall seconds; for a flow, its tasks and the seconds they spent inside."""

    label: str
    wall: float
    workers: int = 1
    tasks: int | None = None
    in_tasks: float = 0.0

    @property
    def outside(self) -> float:
        return 1 - self.in_tasks / (self.wall * self.workers)

    @property
    def outside_per_task(self) -> float:
        return (self.wall * self.workers - self.in_tasks) / (self.tasks or 1)


def measure(args: argparse.Namespace, pair: tuple[Path, Path]) -> tuple[list[Row], SweepSpec]:
    """Wall seconds of the plain loop (1 thread, all cores) and of the flow per worker count and group size."""
    from flows.runtime import start_runtime, stop_runtime

    sweep = SweepSpec(ranks=args.ranks, methods=args.methods)
    model = pair_model(",".join(map(str, pair)))
    plain = {threads: plain_loop(model, sweep, threads) for threads in (1, os.cpu_count() or 1)}
    rows = [Row(f"plain loop, {threads} torch thread(s)", seconds) for threads, seconds in plain.items()]
    runtime = start_runtime(home=Path(tempfile.mkdtemp(prefix="osd-bench-prefect-")), num_cpus=1)
    try:
        for group_mib in args.group_mib:
            for cpus in (1, 2):
                timing = child(args, pair, cpus, group_mib, runtime.api_url)
                for run in ("cold", "warm"):
                    wall, tasks, inside = timing[run]
                    rows.append(Row(f"flow, {cpus} Ray worker(s), {group_mib:g} MiB groups, {run}", wall, cpus, tasks,
                                    inside))
    finally:
        stop_runtime()
    return rows, sweep


def workload_pair(name: str) -> tuple[Path, Path]:
    from workloads import build_workload

    workload = build_workload(name, progress=False)
    return workload.base_dir, workload.finetuned_dir


def pair_model(pair: str) -> ModelSpec:
    base, tuned = pair.split(",")
    return ModelSpec("bench", base, tuned)


def plain_loop(model: ModelSpec, sweep: SweepSpec, threads: int) -> float:
    import torch

    from osd_core.compress import compress_checkpoint

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="osd-bench-plain-") as scratch:
            started = time.perf_counter()
            for number, variant in enumerate(sweep.variants()):
                compress_checkpoint(model.base, model.finetuned, Path(scratch) / str(number), variant.config)
            return time.perf_counter() - started
    finally:
        torch.set_num_threads(before)


def child(args: argparse.Namespace, pair: tuple[Path, Path], cpus: int, group_mib: float, api_url: str
          ) -> dict[str, tuple[float, int, float]]:
    command = [
        sys.executable,
        __file__,
        "--pair",
        ",".join(map(str, pair)),
        "--group-mib",
        str(group_mib),
        "--ranks",
        ",".join(map(str, args.ranks)),
        "--methods",
        ",".join(args.methods),
        CHILD_FLAG,
        str(cpus),
        "--api-url",
        api_url,
    ]
    print(f"flow with {cpus} Ray worker(s), {group_mib:g} MiB groups ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(done.stdout.strip().splitlines()[-1])


def flow_timings(model: ModelSpec, sweep: SweepSpec, cpus: int, api_url: str
                 ) -> dict[str, tuple[float, int, float]]:
    """Per run ("cold", "warm"): wall seconds, layer-group tasks, and the seconds inside them."""
    from flows.pipeline import run_model
    from flows.runtime import start_runtime

    start_runtime(api_url=api_url, home=os.environ.get("PREFECT_HOME"), num_cpus=cpus)
    timings = {}
    for run in ("cold", "warm"):
        with tempfile.TemporaryDirectory(prefix="osd-bench-flow-") as store:
            started = time.perf_counter()
            rows = run_model(model, sweep, store)
            wall = time.perf_counter() - started
            if any(row.status != "ok" for row in rows):
                raise SystemExit(f"a variant failed: {[row.params_dict.get('error') for row in rows]}")
            timings[run] = (wall, sum(row.params_dict["compress_tasks"] for row in rows),
                            sum(row.params_dict["compress_seconds"] for row in rows))
    return timings


if __name__ == "__main__":
    main()
