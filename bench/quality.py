"""Accuracy per byte on real fine-tunes: every method at equal paper-accounted bits.

    python bench/quality.py --quick                       # CI: the `tiny` workload, a few minutes
    python bench/quality.py --workloads l6-rt,l6-tweets,l6-drug --ranks 1,2,4 --split eval

For each workload, variant, budget rank r and extra rank c it runs the real path: calibration
(where the variant needs it) → compress_checkpoint → reconstruct_checkpoint → evaluate on the
chosen split, and prints one table. Choices (c, variants) are made on ``--split val`` (carved from
training data); report on ``--split eval`` (held out). Results are appended as JSON lines to
``--results`` so long sweeps can be resumed and tabulated again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import zstandard  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from osd_core.calibration import calibration_gradients  # noqa: E402
from osd_core.calibration_data import GradientFile  # noqa: E402
from osd_core.compress import compress_checkpoint  # noqa: E402
from osd_core.config import CompressionConfig  # noqa: E402
from osd_core.reconstruct import reconstruct_checkpoint  # noqa: E402

# Named variants: the baselines, the paper's OSD as we read it, and the measured alternatives.
VARIANTS: dict[str, dict] = {
    "truncsvd": {"method": "truncsvd"},
    "magtruncsvd": {"method": "magtruncsvd"},
    "magtruncsvd-sigma-u": {"method": "magtruncsvd", "sigma": "u"},
    "magtruncsvd-sigma-v": {"method": "magtruncsvd", "sigma": "v"},
    "magtruncsvd-fp16": {"method": "magtruncsvd", "value_dtype": "float16"},
    "sparse": {"method": "sparse"},
    "osd-taylor": {"method": "osd", "importance": "taylor"},
    "osd-taylor-at-rank-k": {"method": "osd", "importance": "taylor", "gradient_at": "reconstruction"},
    "osd-path": {"method": "osd", "importance": "taylor", "gradient_at": "path"},
    "osd-path-joint": {"method": "osd", "importance": "taylor", "gradient_at": "path", "allocation": "joint"},
    "osd-path-joint+refit": {"method": "osd", "importance": "taylor", "gradient_at": "path", "allocation": "joint",
                             "refit": 2},
    "magtruncsvd+refit": {"method": "magtruncsvd", "refit": 2},
    "osd-damage": {"method": "osd", "importance": "damage"},
    "osd-damage-joint": {"method": "osd", "importance": "damage", "allocation": "joint"},
    "osd-damage+refit": {"method": "osd", "importance": "damage", "refit": 2},
    "osd-damage-joint+refit": {"method": "osd", "importance": "damage", "allocation": "joint", "refit": 2},
    "osd-activation-damage-joint+refit": {"method": "osd", "importance": "damage", "metric": "activation",
                                          "allocation": "joint", "refit": 2},
    "osd-fisher-damage-joint+refit": {"method": "osd", "importance": "damage", "metric": "fisher",
                                      "allocation": "joint", "refit": 2},
    "osd-fisher-damage-joint+refit-fp16": {"method": "osd", "importance": "damage", "metric": "fisher",
                                           "allocation": "joint", "refit": 2, "value_dtype": "float16"},
    "osd-kfac-damage-joint+refit": {"method": "osd", "importance": "damage", "metric": "kfac",
                                    "allocation": "joint", "refit": 2},
    "osd-frobenius-damage-joint+refit": {"method": "osd", "importance": "damage", "metric": "frobenius",
                                         "allocation": "joint", "refit": 2},
    "osd-fisher-whiten-damage-joint+refit": {"method": "osd", "importance": "damage", "metric": "fisher",
                                             "whiten": True, "allocation": "joint", "refit": 2},
    "osd-whiten-damage+refit": {"method": "osd", "importance": "damage", "whiten": True, "refit": 2},
    "osd-whiten-damage-joint+refit": {"method": "osd", "importance": "damage", "whiten": True,
                                      "allocation": "joint", "refit": 2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="l6-rt")
    parser.add_argument("--variants", default="truncsvd,magtruncsvd,sparse,osd-taylor")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--extra-ranks", default="2", help="c values swept for the relaxed methods")
    parser.add_argument("--split", choices=("val", "eval"), default="val")
    parser.add_argument("--results", type=Path, default=Path(".osd-fleet/quality.jsonl"))
    parser.add_argument("--quick", action="store_true", help="tiny workload, r=1, a few variants (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.workloads, args.ranks, args.extra_ranks = "tiny", "1", "2"
        args.variants = "truncsvd,magtruncsvd,osd-taylor,osd-damage-joint+refit"
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    return args


def scale_row(workload) -> dict:
    """Bytes of the full fine-tune, the fp16 dense delta and the zstd-compressed fp16 delta."""
    base = load_file(workload.base_dir / "model.safetensors")
    tuned = load_file(workload.finetuned_dir / "model.safetensors")
    delta = b"".join((tuned[k].float() - base[k].float()).half().numpy().tobytes() for k in sorted(tuned))
    return {
        "finetuned_bytes": (workload.finetuned_dir / "model.safetensors").stat().st_size,
        "delta_fp16_bytes": len(delta),
        "delta_fp16_zstd_bytes": len(zstandard.ZstdCompressor(level=19).compress(delta)),
    }


def run_point(workload, variant: str, config: CompressionConfig, split: str, scratch: Path, grads_cache: dict) -> dict:
    from workloads.evaluate import evaluate_checkpoint

    started = time.perf_counter()
    gradients, calib_seconds = None, 0.0
    if config.needs_gradients:
        key = (config.gradient_at, config.k if config.gradient_at == "reconstruction" else None)  # noqa: E501
        if key not in grads_cache:
            t0 = time.perf_counter()
            path = calibration_gradients(workload.base_dir, workload.finetuned_dir, workload.calib_path, config,
                                         scratch / f"grads-{len(grads_cache)}.safetensors")
            grads_cache[key] = (GradientFile(path), time.perf_counter() - t0)
        gradients, calib_seconds = grads_cache[key]
    delta = scratch / f"delta-{variant}-{config.rank}-{config.extra_rank}"
    report = compress_checkpoint(workload.base_dir, workload.finetuned_dir, delta, config, gradients=gradients,
                                 overwrite=True)
    restored = reconstruct_checkpoint(workload.base_dir, delta, scratch / "restored", overwrite=True)
    data = workload.val_path if split == "val" else workload.eval_path
    result = evaluate_checkpoint(restored, data, progress=False, tokenizer_dir=workload.base_dir)
    return {
        "workload": workload.name, "variant": variant, "r": config.rank,
        "c": 0 if config.method == "truncsvd" else config.extra_rank, "split": split,
        "budget_bits": report.budget_bits, "paper_bits": report.paper_bits, "bytes": report.bytes_written,
        "accuracy": result.accuracy, "macro_f1": result.macro_f1, "n": result.n,
        "calibration_seconds": round(calib_seconds, 1), "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    from workloads import build_workload

    args = parse_args(argv)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.workloads.split(","):
        workload = build_workload(name)
        full = workload.scores["finetuned"][args.split].accuracy
        scale = scale_row(workload)
        print(f"\n{name}: full fine-tune {args.split} accuracy {full:.4f}; fine-tune {scale['finetuned_bytes']:,} B, "
              f"fp16 dense delta {scale['delta_fp16_bytes']:,} B, zstd fp16 delta {scale['delta_fp16_zstd_bytes']:,} B",
              flush=True)
        print(f"{'variant':<32} {'r':>2} {'c':>2} {'budget bits':>12} {'paper bits':>12} {'bytes':>10} "
              f"{'accuracy':>8} {'of full':>7} {'s':>6}", flush=True)
        with tempfile.TemporaryDirectory(prefix="osd-quality-") as tmp:
            grads_cache: dict = {}
            for r in (int(x) for x in args.ranks.split(",")):
                for variant in args.variants.split(","):
                    spec = VARIANTS[variant]
                    extras = [0] if spec["method"] in ("truncsvd", "sparse") else [int(c) for c in args.extra_ranks.split(",")]
                    for c in extras:
                        config = replace(CompressionConfig(), rank=r, extra_rank=c, **spec)
                        row = run_point(workload, variant, config, args.split, Path(tmp), grads_cache)
                        row.update(full_accuracy=full, **scale)
                        rows.append(row)
                        with args.results.open("a") as handle:
                            handle.write(json.dumps(row) + "\n")
                        print(f"{variant:<32} {r:>2} {row['c']:>2} {row['budget_bits']:>12,} {row['paper_bits']:>12,} "
                              f"{row['bytes']:>10,} {row['accuracy']:>8.4f} {row['accuracy'] / full:>7.3f} "
                              f"{row['seconds']:>6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
