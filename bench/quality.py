"""Accuracy per byte on real fine-tunes: every method at equal paper-accounted bits.

    python bench/quality.py --quick                       # CI: the `l3-rt` workload, a few minutes
    python bench/quality.py --workloads l6-rt,l6-tweets,l6-drug --ranks 1,2,4 --split eval
    python bench/quality.py --workloads smollm2-sst2 --ranks 0.25,0.5,1,2,4 --split eval  # after `make llm`

For each workload, variant, budget rank r and extra rank c it runs the real path: calibration
(where the variant needs it) → compress_checkpoint → reconstruct_checkpoint → evaluate on the
chosen split, and prints one table. A decoder workload (``smollm2-*``) is scored by log-likelihood
``acc`` on its choice rows, with each row's choice loss beside it (continuous, so it separates points
that tie on a few hundred rows' ``acc``); each cell also measures perplexity on held-out text. Choices (c,
variants) are made on ``--split val`` (carved from training data); report on ``--split eval``
(held out). Results are appended as JSON lines to ``--results`` so long sweeps can be resumed and
tabulated again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import zstandard  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from workloads.calibration import calibration_gradients  # noqa: E402
from osd_core.calibration_data import STATISTICS, GradientFile  # noqa: E402
from osd_core.compress import compress_checkpoint  # noqa: E402
from osd_core.config import ENTRYWISE_METHODS, CompressionConfig  # noqa: E402
from osd_core.errors import BudgetError  # noqa: E402
from osd_core.reconstruct import reconstruct_checkpoint  # noqa: E402

# Named variants: the baselines, the paper's OSD as we read it, and the measured alternatives. Every
# variant names its encoding, so changing the library's defaults never changes what a name measures.
PAPER = {"value_dtype": "float32", "positions": "index", "dense_dtype": "float16"}  # float32 values, flat indices
PACKED = {"value_dtype": "int8", "positions": "auto", "dense_dtype": "float16"}  # int8 values, bitmap or index
WHOLE_INT8 = {"value_dtype": "int8", "positions": "auto", "dense_dtype": "int8"}  # and int8 1-D deltas
INT4 = {"value_dtype": "int4", "positions": "auto", "dense_dtype": "int8"}  # int4 factors, rank 8r
WHOLE_INT4 = {**INT4, "dense_dtype": "int4"}  # and int4 1-D deltas
FISHER_DAMAGE = {"method": "osd", "importance": "damage", "metric": "fisher", "factor_split": "joint", "refit": 2}
VARIANTS: dict[str, dict] = {
    "truncsvd": {"method": "truncsvd", "dense_dtype": "float16"},
    "sparse": {"method": "sparse", **PAPER},
    "magtruncsvd": {"method": "magtruncsvd", **PAPER},
    "osd-taylor": {"method": "osd", "importance": "taylor", **PAPER},
    # the default encoding, and the same masks in it
    "magtruncsvd-int8": {"method": "magtruncsvd", **PACKED},
    # The same model total spent across layers by measured error; each layer's k follows its bits.
    "magtruncsvd-int8-global": {"method": "magtruncsvd", **PACKED, "allocation": "global"},
    # the same with the deltas stored whole (biases, norms) in int8 and one scale each
    "magtruncsvd-int8-whole8": {"method": "magtruncsvd", **WHOLE_INT8},
    "magtruncsvd-int8-whole8-global": {"method": "magtruncsvd", **WHOLE_INT8, "allocation": "global"},
    # narrower values: int4 with a scale per singular vector, twice the rank in the same bits
    "magtruncsvd-int4": {"method": "magtruncsvd", **INT4},
    "magtruncsvd-int4-global": {"method": "magtruncsvd", **INT4, "allocation": "global"},
    "magtruncsvd-int4-whole4": {"method": "magtruncsvd", **WHOLE_INT4},
    "magtruncsvd-int4-whole4-global": {"method": "magtruncsvd", **WHOLE_INT4, "allocation": "global"},
    # the same total spent on the 1-D deltas too: each dropped or kept in int4 where it cuts the most error
    "magtruncsvd-int4-whole4-global-all": {"method": "magtruncsvd", **WHOLE_INT4, "allocation": "global-all"},
    "truncsvd-global": {"method": "truncsvd", "dense_dtype": "float16", "allocation": "global"},
    "osd-taylor-int8-global": {"method": "osd", "importance": "taylor", **PACKED, "allocation": "global"},
    "osd-taylor-int8": {"method": "osd", "importance": "taylor", **PACKED},
    "osd-fisher-damage-joint+refit-int8": {**FISHER_DAMAGE, **PACKED},
    "sparse-int8": {"method": "sparse", **PACKED},
    # a peer: DARE's random drop and rescale, charged the same bits as sparse
    "dare": {"method": "dare", **PAPER},
    "dare-int8": {"method": "dare", **PACKED},
    "bitdelta": {"method": "bitdelta", "dense_dtype": "float16"},  # 1 bit per entry: its bytes do not follow r
    # a peer: ImPart's per-singular-vector random sparsity, density following σ_i
    "impart": {"method": "impart", **PAPER},
    "impart-int8": {"method": "impart", **PACKED},
    # a peer: Delta-CoMe's whole singular vectors at 8, 4 or 2 bits, the widest for the largest σ;
    # its 1-D deltas in int4 as the default's are, so the pair compares the matrices' encodings only
    "deltacome-whole4": {"method": "deltacome", "dense_dtype": "int4"},
    # other encodings
    "magtruncsvd-fp16": {"method": "magtruncsvd", "value_dtype": "float16", "positions": "index"},
    "magtruncsvd-bitmap": {"method": "magtruncsvd", "value_dtype": "float32", "positions": "auto"},
    "magtruncsvd-fp16-bitmap": {"method": "magtruncsvd", "value_dtype": "float16", "positions": "auto"},
    # where the singular values go
    "magtruncsvd-sigma-u": {"method": "magtruncsvd", "sigma": "u", **PAPER},
    "magtruncsvd-sigma-v": {"method": "magtruncsvd", "sigma": "v", **PAPER},
    "magtruncsvd+refit": {"method": "magtruncsvd", "refit": 2, **PAPER},
    # the paper's inferred choices and the importance directions of issue #7
    "osd-taylor-at-rank-k": {"method": "osd", "importance": "taylor", "gradient_at": "reconstruction", **PAPER},
    "osd-path": {"method": "osd", "importance": "taylor", "gradient_at": "path", **PAPER},
    "osd-path-joint": {"method": "osd", "importance": "taylor", "gradient_at": "path", "factor_split": "joint",
                       **PAPER},
    "osd-path-joint+refit": {"method": "osd", "importance": "taylor", "gradient_at": "path", "factor_split": "joint",
                             "refit": 2, **PAPER},
    "osd-damage": {"method": "osd", "importance": "damage", **PAPER},
    "osd-damage-joint": {"method": "osd", "importance": "damage", "factor_split": "joint", **PAPER},
    "osd-damage+refit": {"method": "osd", "importance": "damage", "refit": 2, **PAPER},
    "osd-damage-joint+refit": {"method": "osd", "importance": "damage", "factor_split": "joint", "refit": 2,
                               **PAPER},
    "osd-fisher-damage-joint+refit": {**FISHER_DAMAGE, **PAPER},
    "osd-fisher-damage-joint+refit-fp16": {**FISHER_DAMAGE, "value_dtype": "float16", "positions": "index"},
    "osd-activation-damage-joint+refit": {**FISHER_DAMAGE, "metric": "activation", **PAPER},
    "osd-kfac-damage-joint+refit": {**FISHER_DAMAGE, "metric": "kfac", **PAPER},
    "osd-frobenius-damage-joint+refit": {**FISHER_DAMAGE, "metric": "frobenius", **PAPER},
    "osd-fisher-whiten-damage-joint+refit": {**FISHER_DAMAGE, "whiten": True, **PAPER},
    "osd-whiten-damage+refit": {"method": "osd", "importance": "damage", "whiten": True, "refit": 2, **PAPER},
    "osd-whiten-damage-joint+refit": {"method": "osd", "importance": "damage", "whiten": True,
                                      "factor_split": "joint", "refit": 2, **PAPER},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="l6-rt")
    parser.add_argument("--variants", default="truncsvd,magtruncsvd,sparse,osd-taylor")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--extra-ranks", default="auto",
                        help="c values swept for the relaxed methods; auto: the default rule (3r for int8)")
    parser.add_argument("--split", choices=("val", "eval"), default="val")
    parser.add_argument("--results", type=Path, default=Path(".osd-fleet/quality.jsonl"))
    parser.add_argument("--calib-rows", type=int, default=None,
                        help="calibrate on the first N training rows in calibration order (default: the workload's)")
    parser.add_argument("--quick", action="store_true", help="the l3-rt workload, r=0.25 and 1, a few variants (CI)")
    parser.add_argument("--report", type=Path, metavar="JSONL",
                        help="print the markdown tables of earlier results and exit (what README shows)")
    parser.add_argument("--reference", default="magtruncsvd-int8",
                        help="with --report: the variant paired differences are taken against")
    args = parser.parse_args(argv)
    if args.quick:
        args.workloads, args.ranks, args.extra_ranks = "l3-rt", "0.25,1", "auto"
        args.variants = "truncsvd,magtruncsvd,osd-taylor,magtruncsvd-int8,magtruncsvd-int8-global"
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    return args


def load_workload(name: str, split: str) -> tuple[Any, dict]:
    """The built workload ``name`` (built now if need be) and the full fine-tune's scores on ``split``."""
    from workloads import build_workload
    from workloads.lm_build import LM_WORKLOADS, build_lm_workload

    if name not in LM_WORKLOADS:
        workload = build_workload(name, progress=sys.stderr.isatty())  # bars only for a person watching
        return workload, {"full_accuracy": workload.scores["finetuned"][split].accuracy}
    from workloads.evaluate import score_checkpoint

    workload = build_lm_workload(name)
    base, tuned = workload.scores["base"], workload.scores["finetuned"]
    data = workload.val_path if split == "val" else workload.eval_path
    losses = {who: score_checkpoint(directory, data, progress=False).extra["choice_loss"]  # the two ends of the gain
              for who, directory in (("base", workload.base_dir), ("full", workload.finetuned_dir))}
    return workload, {"full_accuracy": tuned[split]["acc"], "full_perplexity": tuned["text"]["perplexity"],
                      "base_accuracy": base[split]["acc"], "base_perplexity": base["text"]["perplexity"],
                      "full_choice_loss": losses["full"], "base_choice_loss": losses["base"]}


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


def calibration_file(workload, rows: int | None, scratch: Path) -> Path:
    """The workload's calibration rows, or its first ``rows`` training rows in calibration order.

    The workload's own calibration file is a prefix of that order, so more rows than it holds
    extend it with further training rows (never validation or evaluation rows).
    """
    if rows is None:
        return workload.calib_path
    from workloads.data import load_splits
    from workloads.jsonl import write_jsonl
    from workloads.recipes import workload_recipe

    recipe = workload_recipe(workload.name)
    sizes = replace(recipe.sizes, calib=rows)
    path = scratch / f"calib-{rows}.jsonl"
    write_jsonl(load_splits(recipe.dataset, sizes, recipe.seed).calib, path)
    return path


def run_point(workload, variant: str, config: CompressionConfig, split: str, scratch: Path, grads_cache: dict,
              calib_rows: int | None = None, allocation: str = "uniform") -> dict:
    from workloads.evaluate import score_checkpoint
    from workloads.lm_build import LMWorkload

    started = time.perf_counter()
    gradients, calib_seconds = None, 0.0
    if config.needs_gradients:
        key = (config.gradient_at, config.k if config.gradient_at == "reconstruction" else None)  # noqa: E501
        if key not in grads_cache:
            t0 = time.perf_counter()
            path = calibration_gradients(workload.base_dir, workload.finetuned_dir,
                                         calibration_file(workload, calib_rows, scratch), config,
                                         scratch / f"grads-{len(grads_cache)}.safetensors", statistics=STATISTICS)
            grads_cache[key] = (GradientFile(path), time.perf_counter() - t0)
        gradients, calib_seconds = grads_cache[key]
    delta = scratch / f"delta-{variant}-{config.rank}-{config.c}"
    report = compress_checkpoint(workload.base_dir, workload.finetuned_dir, delta, config, gradients=gradients,
                                 overwrite=True, allocation=allocation)
    restored = reconstruct_checkpoint(workload.base_dir, delta, scratch / "restored", overwrite=True)
    data = workload.val_path if split == "val" else workload.eval_path
    result = score_checkpoint(restored, data, progress=False, tokenizer_dir=workload.base_dir)
    row = {
        "workload": workload.name, "variant": variant, "r": config.rank,
        "c": config.c, "split": split, "allocation": allocation,
        "budget_bits": report.budget_bits, "paper_bits": report.paper_bits, "bytes": report.bytes_written,
        "metric": result.metric, "accuracy": result.value, **result.extra, "n": result.n,
        "correct": "".join("1" if right else "0" for right in result.correct),  # per row, for paired intervals
        **({"losses": [round(loss, 5) for loss in result.losses]} if result.losses else {}),
        "calibration_rows": calib_rows, "calibration_seconds": round(calib_seconds, 1),
    }
    if isinstance(workload, LMWorkload):  # does the compressed fine-tune still model plain text?
        row["perplexity"] = score_checkpoint(restored, workload.text_path, progress=False).value
    return {**row, "seconds": round(time.perf_counter() - started, 1)}


def report(path: Path, reference: str = "magtruncsvd-int8") -> str:
    """Markdown tables of the result rows in ``path``: per workload and split, variants by rank.

    Each cell is the accuracy, its fraction of the full fine-tune and the delta's real bytes; the
    c of the relaxed variants is given per rank (it follows r by default). Where rows carry their
    per-row outcomes, a second table gives each variant's difference from ``reference`` on the
    same rows, with a 95% paired-bootstrap interval: what separates a real gap from noise.
    """
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for workload, split in dict.fromkeys((r["workload"], r["split"]) for r in rows):
        group = [r for r in rows if (r["workload"], r["split"]) == (workload, split)]
        first, ranks = group[0], sorted({r["r"] for r in group})
        variants = sorted({r["variant"] for r in group}, key=list(VARIANTS).index)
        sizes = [first[key] / 1e6 for key in ("finetuned_bytes", "delta_fp16_bytes", "delta_fp16_zstd_bytes")]
        text = (f" (held-out perplexity {first['full_perplexity']:.2f}; base {first['base_accuracy']:.4f}, "
                f"perplexity {first['base_perplexity']:.2f})" if "full_perplexity" in first else "")
        if "full_choice_loss" in first:
            text += f", choice loss {first['full_choice_loss']:.4f} (base {first['base_choice_loss']:.4f})"
        out += [f"**{workload}**, {split} split ({first['n']:,} rows), full fine-tune {first['full_accuracy']:.4f}"
                f"{text}; fine-tune {sizes[0]:.1f} MB, fp16 dense delta {sizes[1]:.1f} MB, zstd fp16 delta "
                f"{sizes[2]:.1f} MB",
                "", "| variant | " + " | ".join(f"r = {r}" for r in ranks) + " |", "|---|" + "---|" * len(ranks)]
        for variant in variants:
            cells = []
            for rank in ranks:
                found = [r for r in group if r["variant"] == variant and r["r"] == rank]
                cells.append(" / ".join(
                    f"{r['accuracy']:.4f} ({r['accuracy'] / r['full_accuracy']:.1%}, {r['bytes'] / 1e3:,.0f} KB"
                    + (f", c={r['c']}" if r["c"] else "")
                    + (f", loss {r['choice_loss']:.4f}" if "choice_loss" in r else "")
                    + (f", ppl {r['perplexity']:.2f})" if "perplexity" in r else ")") for r in found) or "–")
            out.append(f"| {variant} | " + " | ".join(cells) + " |")
        out.append("")
        outcomes: dict[tuple, list[str]] = {}
        for r in group:
            if r.get("correct"):
                outcomes.setdefault((r["variant"], r["r"]), []).append(r["correct"])
        paired = {key: found[0] for key, found in outcomes.items() if len(found) == 1}  # one row each, or none
        if any(variant == reference for variant, _ in paired):
            out += [f"Difference from `{reference}` on the same rows, points (95% paired-bootstrap interval):", "",
                    "| variant | " + " | ".join(f"r = {r}" for r in ranks) + " |", "|---|" + "---|" * len(ranks)]
            for variant in (v for v in variants if v != reference):
                cells = []
                for rank in ranks:
                    ours, theirs = paired.get((variant, rank)), paired.get((reference, rank))
                    if ours is None or theirs is None:
                        cells.append("–")
                        continue
                    mean, low, high = paired_difference(ours, theirs)
                    cells.append(f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]")
                out.append(f"| {variant} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def paired_difference(ours: str | Sequence[float], theirs: str | Sequence[float], resamples: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``ours`` minus ``theirs`` over the same rows, with the 2.5 and 97.5 percentiles of
    that difference over rows resampled with replacement. Each is a "0"/"1" string of per-row
    outcomes (the difference is in accuracy) or a list of per-row values such as losses."""
    if len(ours) != len(theirs):
        raise ValueError(f"paired outcomes must cover the same rows, got {len(ours)} and {len(theirs)}")
    diff = np.array([float(a) - float(b) for a, b in zip(ours, theirs, strict=True)], dtype=float)
    means = diff[np.random.default_rng(seed).integers(0, diff.size, (resamples, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    from osd_cli.arguments import number

    args = parse_args(argv)
    if args.report:
        print(report(args.report, args.reference))
        return 0
    args.results.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.workloads.split(","):
        workload, reference = load_workload(name, args.split)
        full = reference["full_accuracy"]
        scale = scale_row(workload)
        print(f"\n{name}: full fine-tune {args.split} accuracy {full:.4f}; fine-tune {scale['finetuned_bytes']:,} B, "
              f"fp16 dense delta {scale['delta_fp16_bytes']:,} B, zstd fp16 delta {scale['delta_fp16_zstd_bytes']:,} B",
              flush=True)
        print(f"{'variant':<32} {'r':>4} {'c':>4} {'budget bits':>12} {'paper bits':>12} {'bytes':>10} "
              f"{'accuracy':>8} {'of full':>7} {'s':>6}", flush=True)
        with tempfile.TemporaryDirectory(prefix="osd-quality-") as tmp:
            grads_cache: dict = {}
            for r in (number(x) for x in args.ranks.split(",")):
                for variant in args.variants.split(","):
                    spec = dict(VARIANTS[variant])
                    allocation = spec.pop("allocation", "uniform")
                    if spec["method"] == "truncsvd" and not float(r).is_integer():
                        continue  # whole singular vectors only, as in fleet sweeps
                    relaxed = spec["method"] not in ("truncsvd", *ENTRYWISE_METHODS)
                    extras = [None if c == "auto" else int(c) for c in args.extra_ranks.split(",")] if relaxed else [0]
                    for c in extras:
                        config = replace(CompressionConfig(), rank=r, extra_rank=c, **spec)
                        try:
                            row = run_point(workload, variant, config, args.split, Path(tmp), grads_cache,
                                            args.calib_rows, allocation)
                        except BudgetError as exc:  # a budget this method cannot hold: a fact, not a crash
                            print(f"{variant:<32} {r:>4} cannot: {exc}", flush=True)
                            continue
                        row.update(**reference, **scale)
                        rows.append(row)
                        with args.results.open("a") as handle:
                            handle.write(json.dumps(row) + "\n")
                        print(f"{variant:<32} {r:>4} {row['c']:>4} {row['budget_bits']:>12,} {row['paper_bits']:>12,} "
                              f"{row['bytes']:>10,} {row['accuracy']:>8.4f} {row['accuracy'] / full:>7.3f} "
                              f"{row['seconds']:>6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
