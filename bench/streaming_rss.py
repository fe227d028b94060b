"""Peak memory of ``osd-fleet compress`` on a decoder pair: bounded by the largest tensor pair, not the model.

    python bench/streaming_rss.py [--layers 30] [--rank 1]
    python bench/streaming_rss.py --workload smollm2-sst2 [--method osd [--batch-size 1]]   # the real pair (`make llm`)

Builds (once, under a temporary directory) a Llama pair of SmolLM2-135M's shapes (hidden 576, FFN
1536, 9 heads / 3 KV heads, vocab 49,152, tied embeddings; 30 layers, 538 MB fp32 per checkpoint)
with seeded random weights and a fine-tune-like delta (low rank plus noise) on every matrix. The
values do not matter for memory; the shapes do. Then runs ``osd-fleet compress`` with default
settings in a child process, sampling its resident set every 20 ms, and prints the peak against:
the same interpreter after what compress loads before its first tensor (its floor: torch,
osd-fleet, and transformers with the model class built on the meta device to derive the tensor
roles), the largest tensor pair (fine-tune and base of the biggest tensor, float32), and one
checkpoint. ``--workload`` measures a built decoder workload's real pair instead; with
``--method osd`` compress also calibrates in that process, and the bound is twice the largest pair
plus the calibration model: its weights and the gradient buffer of every factorised weight (what
taking a gradient must hold; one batch's activations come on top).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 1 << 20


def build_pair(root: Path, layers: int) -> tuple[Path, Path]:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    base, tuned = root / "base", root / "finetuned"
    model.save_pretrained(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                n, d = param.shape
                low = torch.randn(n, 8, generator=generator) @ torch.randn(8, d, generator=generator)
                param.add_(1e-3 * low + 1e-4 * torch.randn(n, d, generator=generator))
    model.save_pretrained(tuned)
    return base, tuned


def calibration_model_mib(base: Path, tuned: Path) -> float:
    """Float32 MiB of the model calibration runs plus one gradient buffer per factorised weight."""
    from osd_core.checkpoint import Checkpoint
    from osd_core.compress import FACTORISED_ACTIONS, plan_pair
    from osd_core.config import CompressionConfig

    base_ckpt, tuned_ckpt = Checkpoint.open(base), Checkpoint.open(tuned)
    plans = plan_pair(base_ckpt, tuned_ckpt, CompressionConfig(method="osd"))
    graded = sum(tuned_ckpt.tensors[p.name].numel for p in plans if p.action in FACTORISED_ACTIONS)
    weights = sum(entry.numel for entry in tuned_ckpt.tensors.values())
    return 4 * (weights + graded) / MIB


def peak_rss(command: list[str]) -> tuple[float, float]:
    """Peak resident set of ``command`` (MiB, sampled every 20 ms) and its wall seconds."""
    started = time.perf_counter()
    child = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    peak = 0
    while child.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {child.stderr.read().decode()[-2000:]}")
    return peak / MIB, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rank", default="1")
    parser.add_argument("--workload", help="a built decoder workload (smollm2-sst2) instead of random weights")
    parser.add_argument("--method", default="magtruncsvd", help="osd calibrates on the workload's rows first")
    parser.add_argument("--batch-size", help="calibration rows per forward pass (compress's default if not given)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="osd-rss-") as tmp:
        extra = ["--method", args.method]
        if args.workload:
            from workloads.lm_build import load_lm_workload

            workload = load_lm_workload(args.workload)
            base, tuned, what = workload.base_dir, workload.finetuned_dir, f"workload {args.workload}"
            if args.method == "osd":
                extra += ["--calibration", str(workload.calib_path)]
                extra += ["--batch-size", args.batch_size] if args.batch_size else []
        else:
            base, tuned = build_pair(Path(tmp), args.layers)
            what = f"Llama of SmolLM2-135M shapes, {args.layers} layers"
        from osd_core.checkpoint import Checkpoint

        checkpoint = Checkpoint.open(tuned)
        largest = max(checkpoint.tensors.values(), key=lambda e: e.numel)
        pair_mib = 2 * 4 * largest.numel / MIB
        model_mib = calibration_model_mib(base, tuned) if args.method == "osd" else 0.0
        probe = ("import json, sys, osd_cli.main, osd_core.compress; from osd_core.roles import policy_for; "
                 "policy_for(json.load(open(sys.argv[1])))")
        floor, _ = peak_rss([sys.executable, "-c", probe, str(tuned / "config.json")])
        peak, seconds = peak_rss([sys.executable, "-m", "osd_cli", "compress", "--base", str(base), "--finetuned",
                                  str(tuned), "--out", str(Path(tmp) / "delta"), "--rank", args.rank, *extra])
    print(f"{what}: {checkpoint.nbytes / MIB:.0f} MiB per checkpoint, largest tensor {largest.name} "
          f"{list(largest.shape)}; compress --rank {args.rank} {' '.join(extra)} took {seconds:.1f} s")
    print("| measure | MiB |")
    print("|---|---:|")
    print(f"| interpreter after imports and role derivation (floor) | {floor:.0f} |")
    print(f"| peak RSS of `osd-fleet compress` | {peak:.0f} |")
    print(f"| peak above the floor | {peak - floor:.0f} |")
    print(f"| largest tensor pair, float32 | {pair_mib:.0f} |")
    print(f"| one checkpoint | {checkpoint.nbytes / MIB:.0f} |")
    if model_mib:
        print(f"| calibration model: weights and the gradients of factorised weights, float32 | {model_mib:.0f} |")
        print(f"| bound: twice the largest pair plus the calibration model | {2 * pair_mib + model_mib:.0f} |")
    print(f"peak above the floor / largest pair: {(peak - floor) / pair_mib:.2f}; "
          f"/ one checkpoint: {(peak - floor) / (checkpoint.nbytes / MIB):.2f}")
    if model_mib:
        print(f"peak above the floor / bound: {(peak - floor) / (2 * pair_mib + model_mib):.2f}")


if __name__ == "__main__":
    main()
