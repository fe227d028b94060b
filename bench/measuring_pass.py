"""The global allocation's measuring pass: one SVD per candidate budget (before) against one per layer (now).

Both passes run in one process on the same real pair, interleaved layer by layer so machine load
falls on both alike, and both feed the same allocator. It prints the time of each, their ratio,
and whether the allocations agree (budget per layer; where they differ, how many layers and the
estimated damage of each). "Before" is the previous ``measure_curve``: every candidate budget
factors the delta afresh at its own rank. "Now" slices every candidate from one truncated SVD at
the largest candidate rank (``osd_core.allocate.measure_curve``).

Usage: ``python bench/measuring_pass.py [--workload tiny] [--rank 0.25] [--repeats 3]``. The
``tiny`` workload has the L6 MiniLM shapes of ``l6-rt`` (its fine-tune is smaller), which is
all the measuring pass's cost depends on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from osd_core.allocate import Option, allocate, candidate_budgets, layer_config, measure_curve  # noqa: E402
from osd_core.budget import layer_budget  # noqa: E402
from osd_core.checkpoint import Checkpoint  # noqa: E402
from osd_core.compress import plan_pair  # noqa: E402
from osd_core.config import CompressionConfig  # noqa: E402
from osd_core.errors import BudgetError  # noqa: E402
from osd_core.factorize import compress_matrix  # noqa: E402


def curve_per_candidate_svd(name: str, delta: torch.Tensor, config: CompressionConfig) -> tuple[Option, ...]:
    """The measuring pass as it was: every candidate budget factors the delta at its own rank."""
    norm2 = float(torch.linalg.vector_norm(delta)) ** 2
    options = [Option(0, norm2)]
    if norm2 == 0.0:
        return tuple(options)
    for budget in candidate_budgets(config, tuple(delta.shape)):
        try:
            approx = compress_matrix(name, delta, layer_config(config, tuple(delta.shape), budget), budget_bits=budget)
        except BudgetError:
            continue
        options.append(Option(budget, float(torch.linalg.vector_norm(delta - approx.delta())) ** 2))
    return tuple(options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="tiny")
    parser.add_argument("--rank", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3, help="passes of each kind; the fastest is reported")
    args = parser.parse_args(argv)
    from workloads import build_workload

    workload = build_workload(args.workload, progress=False)
    base, tuned = Checkpoint.open(workload.base_dir), Checkpoint.open(workload.finetuned_dir)
    config = CompressionConfig(rank=args.rank)
    plans = [p for p in plan_pair(base, tuned, config) if p.action == "factorise"]
    deltas = {p.name: tuned.load(p.name).float() - base.load(p.name).float() for p in plans}
    uniform = {name: layer_budget(*delta.shape, config.rank) for name, delta in deltas.items()}
    timings = {"before": [], "now": []}
    curves: dict[str, dict[str, tuple[Option, ...]]] = {"before": {}, "now": {}}
    for _ in range(args.repeats):
        spent = {"before": 0.0, "now": 0.0}
        for name, delta in deltas.items():
            for kind, measure in (("before", curve_per_candidate_svd), ("now", measure_curve)):
                started = time.perf_counter()
                curves[kind][name] = measure(name, delta, config)
                spent[kind] += time.perf_counter() - started
        for kind in timings:
            timings[kind].append(spent[kind])
    chosen = {kind: allocate(curves[kind], sum(uniform.values()), baseline=uniform) for kind in curves}
    differ = [n for n in uniform if chosen["before"].budgets[n] != chosen["now"].budgets[n]]
    before, now = min(timings["before"]), min(timings["now"])
    print(f"workload {args.workload}: {len(deltas)} factorised tensors, r = {args.rank:g} (global allocation), "
          f"{len(candidate_budgets(config, next(iter(deltas.values())).shape))} candidate budgets per layer, "
          f"torch threads {torch.get_num_threads()}")
    print(f"| measuring pass | seconds (best of {args.repeats}) | ratio |")
    print("|---|---|---|")
    print(f"| before: one SVD per candidate budget | {before:.2f} | 1.00 |")
    print(f"| now: one SVD per layer, sliced | {now:.2f} | {now / before:.2f} |")
    if differ:
        print(f"allocations differ on {len(differ)} of {len(uniform)} layers (e.g. {differ[0]}); estimated damage "
              f"before {chosen['before'].cost:.6g}, now {chosen['now'].cost:.6g}")
    else:
        print(f"same allocation on all {len(uniform)} layers ({chosen['now'].bits:,} of {sum(uniform.values()):,} "
              f"bits; estimated damage before {chosen['before'].cost:.6g}, now {chosen['now'].cost:.6g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
