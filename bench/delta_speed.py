"""Taking a bf16 pair's float32 delta and its summary: torch's mixed-dtype subtraction and three
passes after it, against ``float_difference``'s one blocked pass.

    python bench/delta_speed.py [--sizes 4096x4096,11008x4096,32000x4096] [--repeats 5]

Both write the delta into memory reused from call to call, as compression does on the CPU
(``osd_core.pair_buffers``). The three passes are what compression ran on every delta before:
a finiteness sum, a min/max and a squared norm. The deltas are checked equal bit for bit and the
summaries equal to 1e-6. Prints milliseconds per pair and the ratio, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from osd_core.finite import all_finite, value_range
from osd_core.float_delta import DeltaSummary, float_difference
from osd_core.norms import squared_norm


def best_ms(work: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` runs after one warm-up: the least disturbed by a shared machine."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def three_passes(out: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor) -> DeltaSummary:
    """The delta by mixed-dtype subtraction, then the passes that summarised it one by one."""
    out.copy_(tuned).sub_(base)
    all_finite(out)
    low, high = value_range(out)
    return DeltaSummary(low, high, squared_norm(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096x4096,11008x4096,32000x4096")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shape | mixed-dtype sub_ ms | and three passes ms | float_difference ms | speed-up |\n"
          "|---|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        shape = tuple(int(side) for side in size.split("x"))
        base = torch.randn(shape, generator=generator).bfloat16()
        tuned = (base.float() + 1e-3 * torch.randn(shape, generator=generator)).bfloat16()
        mixed_out, blocked_out = torch.empty(shape), torch.empty(shape)
        mixed = best_ms(lambda: mixed_out.copy_(tuned).sub_(base), args.repeats)
        passes = best_ms(lambda: three_passes(mixed_out, tuned, base), args.repeats)
        blocked = best_ms(lambda: float_difference(tuned, base, blocked_out), args.repeats)
        expected, (_, got) = three_passes(mixed_out, tuned, base), float_difference(tuned, base, blocked_out)
        if not torch.equal(mixed_out, blocked_out):
            raise SystemExit(f"{size}: float_difference's delta differs from the mixed-dtype subtraction")
        if (expected.low, expected.high) != (got.low, got.high) or \
                abs(expected.squared_norm - got.squared_norm) > 1e-6 * expected.squared_norm:
            raise SystemExit(f"{size}: summaries differ: {expected} against {got}")
        print(f"| {size} | {mixed:.0f} | {passes:.0f} | {blocked:.0f} | {passes / blocked:.1f}× |")


if __name__ == "__main__":
    main()
