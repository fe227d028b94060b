"""Where a small delta's bytes go: the factors against the fixed overhead, per encoding.

    python bench/overhead.py --workload l6-rt --ranks 0.25,1 --allocations global,global-all

The budget ``32·r·(n+d)`` counts the factors only. Everything else in a delta directory is a
fixed overhead that does not shrink with r: the deltas stored whole (biases, norms, a head too
small to factor), a replaced head, each payload's safetensors header, the manifest and the side
files. At r = 0.25 on MiniLM it was most of the delta. The ``global-all`` allocation brings the
1-D deltas inside the budget, so what stays outside is only the headers, manifest, side files and
a replaced head. For each allocation, rank and ``dense_dtype`` this compresses the workload's pair
with the default method, then reads the files back and prints each part's bytes and the share of
the total outside the budget, side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from osd_core.artifact import MANIFEST, DeltaArtifact  # noqa: E402
from osd_core.compress import compress_checkpoint  # noqa: E402
from osd_core.config import ALLOCATIONS, DENSE_DTYPES, CompressionConfig  # noqa: E402

PARTS = ("factors", "whole deltas", "replaced", "payload headers", "manifest", "side files")


def byte_parts(delta: Path) -> tuple[Counter[str], int]:
    """Bytes of ``delta``'s files by what they hold (see ``PARTS``), and the bytes of the tensors
    inside the budget (those whose manifest entry records a budget: every factored matrix, and
    under ``global-all`` the 1-D deltas)."""
    artifact = DeltaArtifact.open(delta)
    parts: Counter[str] = Counter()
    budgeted = 0
    for layer in artifact.layers():
        part = {"dense": "whole deltas", "replace": "replaced"}.get(layer.kind, "factors")
        parts[part] += layer.nbytes
        budgeted += layer.nbytes if layer.budget_bits is not None else 0
    tensor_bytes = sum(parts.values())
    parts["payload headers"] = sum(info.bytes for info in artifact.manifest.payloads.values()) - tensor_bytes
    parts["manifest"] = (delta / MANIFEST).stat().st_size
    parts["side files"] = sum(info.bytes for info in artifact.manifest.files.values())
    return parts, budgeted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="l6-rt")
    parser.add_argument("--ranks", default="0.25,1")
    parser.add_argument("--allocations", default="global,global-all", help=f"of {', '.join(ALLOCATIONS)}")
    parser.add_argument("--dense-dtypes", default=",".join(DENSE_DTYPES))
    args = parser.parse_args(argv)
    allocations = args.allocations.split(",")
    unknown = sorted(set(allocations) - set(ALLOCATIONS))
    if unknown:
        parser.error(f"unknown allocation {unknown[0]!r}: expected {', '.join(ALLOCATIONS)}")

    from workloads import build_workload

    workload = build_workload(args.workload, progress=sys.stderr.isatty())
    print(f"{args.workload}, default method; bytes of each part")
    print("| allocation | r | dense_dtype | " + " | ".join(PARTS) + " | total | outside the budget | share |")
    print("|---|---:|---|" + "---:|" * (len(PARTS) + 3))
    with tempfile.TemporaryDirectory() as scratch:
        for allocation in allocations:
            for rank in (float(r) for r in args.ranks.split(",")):
                for dense_dtype in args.dense_dtypes.split(","):
                    config = CompressionConfig(rank=rank, dense_dtype=dense_dtype)
                    out = Path(scratch) / f"delta-{allocation}-{rank}-{dense_dtype}"
                    compress_checkpoint(workload.base_dir, workload.finetuned_dir, out, config, allocation=allocation)
                    parts, budgeted = byte_parts(out)
                    total = sum(parts.values())
                    print(f"| {allocation} | {config.rank} | {dense_dtype} | "
                          + " | ".join(f"{parts[p]:,}" for p in PARTS)
                          + f" | {total:,} | {total - budgeted:,} | {(total - budgeted) / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
