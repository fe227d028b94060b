"""What orchestration costs: the fleet flow against the same math in a plain loop, and 1 vs 2 workers.

    python bench/pipeline.py [--workload tiny] [--ranks 1,2,4] [--methods truncsvd,magtruncsvd]

Compresses every variant (methods × budget ranks, uniform allocation, no evaluation) of one
workload three ways, each into a fresh store:

- plain loop: ``osd_core.compress.compress_checkpoint`` per variant in this process, with one
  torch thread (what one Ray worker gets) and with all cores;
- the ``compress_model`` flow on a local Ray with 1 CPU, then with 2 CPUs, each in a child
  process that joins this process's Prefect server. The first flow run in a fresh Ray is
  "cold" (workers import torch and Prefect); the second, on a new store, is "warm".

Prints a table of wall times, throughput and the ratio to the one-thread plain loop (for one
worker, the orchestration overhead). On a shared machine multi-threaded torch can be slower
than one thread (oversubscribed cores): both plain rows are shown for that reason. Methods
that need calibration (osd) are left out by default so that all three do the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flows.fleet_config import ModelSpec, SweepSpec
from osd_cli.arguments import comma_list

CHILD_FLAG = "--child"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="tiny")
    parser.add_argument("--ranks", type=comma_list(int), default=(1, 2, 4))
    parser.add_argument("--methods", type=comma_list(str), default=("truncsvd", "magtruncsvd"))
    parser.add_argument(CHILD_FLAG, type=int, help=argparse.SUPPRESS)  # internal: run the flow with this many CPUs
    parser.add_argument("--api-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sweep = SweepSpec(ranks=args.ranks, methods=args.methods)
    model = workload_model(args.workload)
    if args.child is not None:
        print(json.dumps(flow_timings(model, sweep, args.child, args.api_url)))
        return
    from flows.runtime import start_runtime, stop_runtime

    plain = {threads: plain_loop(model, sweep, threads) for threads in (1, os.cpu_count() or 1)}
    runtime = start_runtime(home=Path(tempfile.mkdtemp(prefix="osd-bench-prefect-")), num_cpus=1)
    try:
        flows = {cpus: child(args, cpus, runtime.api_url) for cpus in (1, 2)}
    finally:
        stop_runtime()
    variants = len(sweep.variants())
    rows = [(f"plain loop, {threads} torch thread(s)", seconds) for threads, seconds in plain.items()]
    for cpus, timing in flows.items():
        rows += [
            (f"flow, {cpus} Ray worker(s), cold", timing["cold"]),
            (f"flow, {cpus} Ray worker(s), warm", timing["warm"]),
        ]
    print(f"\n{args.workload}: {variants} variants ({', '.join(v.label for v in sweep.variants())})")
    print(f"{'setup':<36} {'wall s':>8} {'variants/s':>11} {'x plain, 1 thread':>18}")
    for label, seconds in rows:
        print(f"{label:<36} {seconds:>8.1f} {variants / seconds:>11.3f} {seconds / plain[1]:>18.2f}")


def workload_model(name: str) -> ModelSpec:
    from workloads import build_workload

    workload = build_workload(name, progress=False)
    return ModelSpec(name, str(workload.base_dir), str(workload.finetuned_dir))


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


def child(args: argparse.Namespace, cpus: int, api_url: str) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--workload",
        args.workload,
        "--ranks",
        ",".join(map(str, args.ranks)),
        "--methods",
        ",".join(args.methods),
        CHILD_FLAG,
        str(cpus),
        "--api-url",
        api_url,
    ]
    print(f"flow with {cpus} Ray worker(s) ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(done.stdout.strip().splitlines()[-1])


def flow_timings(model: ModelSpec, sweep: SweepSpec, cpus: int, api_url: str) -> dict[str, float]:
    from flows.pipeline import run_model
    from flows.runtime import start_runtime

    start_runtime(api_url=api_url, home=os.environ.get("PREFECT_HOME"), num_cpus=cpus)
    timings = {}
    for run in ("cold", "warm"):
        with tempfile.TemporaryDirectory(prefix="osd-bench-flow-") as store:
            started = time.perf_counter()
            rows = run_model(model, sweep, store)
            timings[run] = time.perf_counter() - started
            if any(row.status != "ok" for row in rows):
                raise SystemExit(f"a variant failed: {[row.params_dict.get('error') for row in rows]}")
    return timings


if __name__ == "__main__":
    main()
