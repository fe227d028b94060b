"""The single-process commands: ``compress``, ``reconstruct``, ``export``, ``evaluate`` and ``workloads``.

Each parses its flags into the library's configuration and calls ``osd_core`` (or ``workloads``)
in this process; no Prefect or Ray is imported. Progress bars go to stderr so ``--json`` output
on stdout stays parseable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from osd_cli.arguments import positive_int
from osd_cli.flags import add_settings, read_settings
from osd_core.config import (
    ADAPTER_DTYPES,
    ADAPTER_PROFILES,
    ALLOCATIONS,
    CALIBRATION_BATCH,
    GLOBAL_ALLOCATIONS,
    CompressionConfig,
)
from osd_core.errors import ConfigError
from osd_core.file_hashes import hashing_ahead
from osd_core.outputs import scratch_dir
from osd_core.weight_files import local_shards


def add_delta_commands(commands: Any) -> None:
    """Register the single-process subcommands on the ``osd-fleet`` subparsers object."""
    compress = commands.add_parser("compress", help="compress a fine-tune's delta against its base")
    compress.add_argument("--base", required=True, type=Path, help="base checkpoint directory (HF layout)")
    compress.add_argument("--finetuned", required=True, type=Path, help="fine-tuned checkpoint directory")
    compress.add_argument("--out", required=True, type=Path, help="delta directory to create")
    add_settings(compress, CompressionConfig)
    compress.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                          help="across layers: the paper's 32·r·(n+d) each; global: the same total spent "
                               "where it cuts the most error (each layer's k follows its bits); global-all: that "
                               "total spent on the 1-D deltas (biases, norms) too, which the others store beside it")
    compress.add_argument("--calibration", type=Path, help="JSONL rows {text, label} (needed by osd)")
    compress.add_argument("--batch-size", type=positive_int, default=CALIBRATION_BATCH,
                          help="calibration rows per forward pass: bounds activation memory; the gradient is the "
                               "same at any size")
    compress.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing delta directory")
    compress.add_argument("--json", action="store_true", help="print one JSON object with the report")
    compress.set_defaults(handler=run_compress)

    restore = commands.add_parser("reconstruct", help="rebuild the fine-tune from base and delta")
    restore.add_argument("--base", required=True, type=Path)
    restore.add_argument("--delta", required=True, type=Path)
    restore.add_argument("--out", required=True, type=Path)
    restore.add_argument("--overwrite", action="store_true")
    restore.add_argument("--check-base", action=argparse.BooleanOptionalAction, default=True,
                         help="refuse a base whose weights differ from the one the delta was made against")
    restore.set_defaults(handler=run_reconstruct)

    export = commands.add_parser("export", help="write a delta as a LoRA adapter (PEFT's layout) for its base")
    export.add_argument("--delta", required=True, type=Path, help="delta directory")
    export.add_argument("--base", required=True, type=Path, help="the base checkpoint the delta was made against")
    export.add_argument("--out", required=True, type=Path, help="adapter directory to create")
    export.add_argument("--format", choices=("peft",), default="peft",
                        help="adapter_config.json + adapter_model.safetensors, as PeftModel.from_pretrained loads")
    export.add_argument("--profile", choices=ADAPTER_PROFILES, default="peft",
                        help="peft: every delta (norms, biases, head via modules_to_save); vllm: LoRA on linear maps "
                             "only, one rank from vLLM's set, no modules_to_save or biases (the rest is reported)")
    export.add_argument("--dtype", choices=ADAPTER_DTYPES, default="float16", help="adapter tensor type")
    export.add_argument("--overwrite", action="store_true", help="replace an adapter exported before")
    export.add_argument("--check-base", action=argparse.BooleanOptionalAction, default=True,
                        help="refuse a base whose weights differ from the one the delta was made against")
    export.add_argument("--json", action="store_true", help="print one JSON object with the report")
    export.set_defaults(handler=run_export)

    evaluate = commands.add_parser("evaluate", help="score base + compressed delta on JSONL rows (accuracy, "
                                                    "log-likelihood acc/acc_norm or perplexity)")
    evaluate.add_argument("--base", required=True, type=Path)
    evaluate.add_argument("--delta", required=True, type=Path)
    evaluate.add_argument("--data", required=True, type=Path,
                          help="JSONL rows: {text, label} for a classifier; {prompt, choices, label} (acc), "
                               "{text}, {prompt, completion} or {messages} (perplexity) for a causal LM")
    evaluate.add_argument("--batch-size", type=positive_int, help="rows per batch (default: 64 classifier, 16 LM)")
    evaluate.add_argument("--max-length", type=positive_int, help="tokens per row (default: 64 classifier, 256 LM)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=run_evaluate)

    workloads = commands.add_parser("workloads", help="build or list the packaged real workloads",
                                    add_help=False)
    workloads.add_argument("rest", nargs=argparse.REMAINDER)
    workloads.set_defaults(handler=lambda args: _workloads_main(args.rest))


def run_compress(args: argparse.Namespace) -> int:
    config = CompressionConfig(**read_settings(args, CompressionConfig))
    if config.needs_gradients and args.calibration is None:
        raise ConfigError("method 'osd' needs --calibration FILE (JSONL rows with text and label)")
    # The provenance hashes start now, on the core torch's import leaves idle.
    with hashing_ahead([*local_shards(args.base), *local_shards(args.finetuned)]):
        return _compress(args, config)


def _compress(args: argparse.Namespace, config: CompressionConfig) -> int:
    from osd_core.artifact import check_delta_output
    from osd_core.compress import compress_checkpoint

    inputs = [args.base, args.finetuned, *([args.calibration] if args.calibration else [])]
    check_delta_output(args.out, inputs=inputs, overwrite=args.overwrite)  # before minutes of work
    if config.rank < 1 and args.allocation == "uniform" and config.factorises:
        print(f"osd-fleet: note: below a rank-1 budget a uniform split leaves most layers a rank-{config.k} "
              "factorisation whether they need it or not; --allocation global-all spends the same bits where "
              "they cut the most error, the biases' and norms' included (better on the MiniLM fine-tunes; on "
              "the SmolLM2 decoder at r = 0.0625 the uniform split kept more of the task's gain: README, Results)",
              file=sys.stderr)
    with scratch_dir("compress") as scratch:
        gradients = None
        if config.needs_gradients:
            from workloads.calibration import calibration_gradients
            from osd_core.calibration_data import GradientFile

            with tqdm(desc="calibration gradients", unit="batch", file=sys.stderr, disable=None) as bar:
                path = calibration_gradients(
                    args.base, args.finetuned, args.calibration, config, Path(scratch) / "gradients.safetensors",
                    batch_size=args.batch_size, progress=lambda done, total: _advance(bar, done, total),
                )
            gradients = GradientFile(path)
        with tqdm(desc=f"compress {args.finetuned.name}", unit="tensor", file=sys.stderr, disable=None) as bar, \
                tqdm(desc="measure layers for the global allocation", unit="tensor", file=sys.stderr,
                     disable=None if args.allocation in GLOBAL_ALLOCATIONS else True) as measuring:
            report = compress_checkpoint(
                args.base, args.finetuned, args.out, config, gradients=gradients, device=args.device,
                overwrite=args.overwrite, allocation=args.allocation,
                on_layer=lambda layer, done, total: _advance(bar, done, total),
                on_measured=lambda name, done, total: _advance(measuring, done, total),
            )
    summary = {
        "method": config.method, "r": config.rank, "c": config.c, "allocation": args.allocation,
        "budget_bits": report.budget_bits, "paper_bits": report.paper_bits,
        "bytes_written": report.bytes_written, "payload_bytes": report.payload_bytes,
        "dense_bytes_fp16": report.dense_bytes_fp16, "seconds": round(report.seconds, 3),
        "out": report.out_dir, "unknown_tensors": list(report.unknown),
        "layers": {layer.name: {"kind": layer.kind, "rel_error": round(layer.rel_error, 6),
                                "paper_bits": layer.paper_bits, "budget_bits": layer.budget_bits,
                                "bytes": layer.bytes} for layer in report.layers},
    }
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"{report.out_dir}: {config.method} r={config.rank} k={config.k} {args.allocation}: "
              f"{report.paper_bits:,} of "
              f"{report.budget_bits:,} budget bits; {report.bytes_written:,} bytes on disk "
              f"(dense fp16 delta: {report.dense_bytes_fp16:,}); {report.seconds:.1f} s")
    return 0


def run_reconstruct(args: argparse.Namespace) -> int:
    from osd_core.reconstruct import reconstruct_checkpoint

    out = reconstruct_checkpoint(args.base, args.delta, args.out, overwrite=args.overwrite, check_base=args.check_base)
    print(out)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from osd_core.adapters import export_adapter

    report = export_adapter(args.base, args.delta, args.out, profile=args.profile, dtype=args.dtype,
                            overwrite=args.overwrite, check_base=args.check_base)
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
        return 0
    print(f"{report.out}: {args.profile} LoRA adapter, r = {report.rank}, {report.lora_modules} LoRA modules, "
          f"{len(report.saved_modules)} modules saved whole")
    if report.left_out:
        print(f"osd-fleet: note: the {args.profile} profile leaves out {len(report.left_out)} tensor deltas, e.g. "
              f"{', '.join(report.left_out[:3])}; serve the merged checkpoint (reconstruct) where they matter",
              file=sys.stderr)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Reconstruct into a scratch directory and score it: the same path users serve from."""
    from osd_core.reconstruct import reconstruct_checkpoint
    from workloads.evaluate import score_checkpoint

    with scratch_dir("eval") as scratch:
        restored = reconstruct_checkpoint(args.base, args.delta, Path(scratch) / "model")
        score = score_checkpoint(restored, args.data, batch_size=args.batch_size, max_length=args.max_length,
                                 progress=sys.stderr.isatty(), tokenizer_dir=args.base)
    if args.json:
        print(json.dumps({"metric": score.metric, "value": score.value, score.metric: score.value, **score.extra,
                          "n": score.n, "seconds": round(score.seconds, 3)}, sort_keys=True))
    else:
        extra = "".join(f", {name} {value:.4g}" for name, value in score.extra.items())
        print(f"{score.metric} {score.value:.4f}{extra} on {score.n} rows of {args.data}")
    return 0


def _workloads_main(argv: list[str]) -> int:
    from workloads.__main__ import main as workloads_main

    return workloads_main(argv)


def _advance(bar: tqdm, done: int, total: int) -> None:
    bar.total = total
    bar.n = done
    bar.refresh()
