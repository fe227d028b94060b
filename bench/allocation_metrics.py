"""Which error measure should a global allocation minimise? Frobenius against loss-weighted ones.

    python bench/allocation_metrics.py --workload l6-rt --ranks 0.25,0.5,1 --split val

Isolates the across-layer decision: every factorised layer keeps a dense rank-k factorisation
with int8 values (a per-column scale), and the model's bits (``Σ 32·r·(n+d)``) are spent by the
allocator of ``osd_core.allocate`` over per-layer error curves measured in one of four ways:

- ``frob``: ``‖E‖²``, what ``--allocation global`` uses;
- ``kfac``: ``Σ_i f_i (E C Eᵀ)_ii``, output-gradient Fisher ``f`` times input second moment ``C``
  (a second-order estimate of the loss increase, comparable across layers);
- ``fisher``: output Fisher only; ``act``: input second moment only.

The statistics come from the workload's calibration rows at the fine-tuned weights. Prints one
JSON line per rank with each allocation's accuracy, beside uniform dense rank ``4r``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from osd_core.allocate import Option, allocate  # noqa: E402
from workloads.calibration import calibration_gradients  # noqa: E402
from osd_core.calibration_data import INPUT_COV, OUTPUT_FISHER, ROW_WEIGHT, STATISTICS, GradientFile  # noqa: E402
from osd_core.checkpoint import Checkpoint  # noqa: E402
from osd_core.compress import plan_pair  # noqa: E402
from osd_core.config import CompressionConfig  # noqa: E402

MAX_RANK = 24


def int8(x: torch.Tensor) -> torch.Tensor:
    """Round-trip through int8 with one scale per column, as the default encoding stores factors."""
    scale = x.abs().amax(0).clamp_min(1e-30) / 127
    return torch.round(x / scale) * scale


def measures(stats: dict[str, torch.Tensor]) -> dict:
    """The four error measures of one layer, from its calibration statistics."""
    if ROW_WEIGHT in stats:  # embedding table: rows are tokens (by frequency), columns its outputs
        rows = stats[ROW_WEIGHT].float()
        cols = stats[OUTPUT_FISHER].float() if OUTPUT_FISHER in stats else torch.ones(rows.numel())
        weighted = lambda e: float((rows[:, None] * e * e * cols[None, :]).sum())  # noqa: E731
        return {"frob": lambda e: float(e.pow(2).sum()), "kfac": weighted, "fisher": weighted,
                "act": lambda e: float((rows[:, None] * e * e).sum())}
    fisher, cov = stats[OUTPUT_FISHER].float(), stats[INPUT_COV].float()
    return {
        "frob": lambda e: float(e.pow(2).sum()),
        "kfac": lambda e: float((fisher[:, None] * (e @ cov) * e).sum()),
        "fisher": lambda e: float((fisher[:, None] * e * e).sum()) * float(torch.diagonal(cov).mean()),
        "act": lambda e: float(((e @ cov) * e).sum()) * float(fisher.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    from workloads import build_workload
    from workloads.evaluate import evaluate_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="l6-rt")
    parser.add_argument("--ranks", default="0.25,0.5,1")
    parser.add_argument("--split", choices=("val", "eval"), default="val")
    args = parser.parse_args(argv)
    workload = build_workload(args.workload, progress=sys.stderr.isatty())
    config = CompressionConfig(method="osd", importance="damage")
    base = load_file(workload.base_dir / "model.safetensors")
    tuned = load_file(workload.finetuned_dir / "model.safetensors")
    names = [p.name for p in plan_pair(Checkpoint.open(workload.base_dir), Checkpoint.open(workload.finetuned_dir),
                                       config) if p.action == "factorise"]
    with tempfile.TemporaryDirectory(prefix="osd-alloc-") as tmp:
        grads = GradientFile(calibration_gradients(workload.base_dir, workload.finetuned_dir, workload.calib_path,
                                                   config, Path(tmp) / "grads.safetensors", statistics=STATISTICS))
        factors, curves = {}, {key: {} for key in ("frob", "kfac", "fisher", "act")}
        for name in names:
            delta = tuned[name].float() - base[name].float()
            (n, d), fns = delta.shape, measures(grads.statistics(name))
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            top = min(MAX_RANK, n, d)
            factors[name] = (u[:, :top] * s[:top].sqrt(), vh[:top].T * s[:top].sqrt())
            for k in range(top + 1):
                error = delta - int8(factors[name][0][:, :k]) @ int8(factors[name][1][:, :k]).T
                for key, fn in fns.items():
                    curves[key].setdefault(name, []).append(Option(k * (8 * (n + d) + 64), fn(error)))

        def accuracy(ranks: dict[str, int]) -> float:
            state = {}
            for key, tensor in tuned.items():
                if key in ranks:
                    a, b = factors[key]
                    k = ranks[key]
                    state[key] = (base[key].float() + int8(a[:, :k]) @ int8(b[:, :k]).T).to(tensor.dtype)
                elif key in base and tensor.is_floating_point():  # stored dense in fp16, as the product does
                    delta = (tensor.float() - base[key].float()).half().float()
                    state[key] = (base[key].float() + delta).to(tensor.dtype)
                else:
                    state[key] = tensor
            out = Path(tmp) / "model"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(workload.finetuned_dir, out)
            save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
            data = workload.val_path if args.split == "val" else workload.eval_path
            return evaluate_checkpoint(out, data, progress=False, tokenizer_dir=workload.base_dir).accuracy

        for rank in (float(x) for x in args.ranks.split(",")):
            total = int(sum(32 * rank * sum(tuned[name].shape) for name in names))
            row = {"workload": args.workload, "split": args.split, "r": rank,
                   "full": workload.scores["finetuned"][args.split].accuracy}
            if int(4 * rank) >= 1:
                row["uniform dense k=4r"] = accuracy({name: int(4 * rank) for name in names})
            for key, by_layer in curves.items():
                chosen = allocate(by_layer, total)
                row[key] = accuracy({name: sum(o.bits <= chosen.budgets[name] for o in by_layer[name]) - 1
                                     for name in names})
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
