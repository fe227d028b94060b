"""Serving a stored delta: what each way of serving it scores, and what N fine-tunes cost on one base.

    python bench/lora_serving.py --workload smollm2-sst2 [--rank 1] [--adapters 1,4,16]   # after `make llm`

One delta of the workload (default settings at ``--rank``) is served three ways and scored on the
workload's eval rows: merged (``reconstruct``), as a PEFT adapter of the ``peft`` profile, and as
one of the ``vllm`` profile (LoRA on linear maps only: the norms, embeddings and ``lm_head``
deltas it leaves out are the accuracy cost measured here; PEFT applies it, since vLLM does not run
on this machine). Then, each in a fresh child process so resident memory is its own, N fine-tunes
are held at once: one base plus N ``vllm``-profile adapters (PEFT ``load_adapter``, switching with
``set_adapter`` per batch) against N merged checkpoints, for N in ``--adapters``. Memory is the
child's resident set with all N held; throughput is forward tokens per second over batches of the eval
prompts, one batch per fine-tune in turn. The N adapters and the N merged checkpoints are copies
of one export each, in N separate files: memory and speed depend on their shapes, not their values,
and separate files keep the pages of N checkpoints from being shared, as N real fine-tunes' would
not be (transformers maps safetensors files).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
MIB = 1 << 20
BATCHES = 8  # forward batches per measurement, spread over the fine-tunes held
BATCH_ROWS = 16


def prepare(workload, rank: float, root: Path) -> dict[str, Path]:
    """The delta, its merged checkpoint and both adapter profiles, under ``root``."""
    from osd_core.adapters import export_adapter
    from osd_core.compress import compress_checkpoint
    from osd_core.config import CompressionConfig
    from osd_core.reconstruct import reconstruct_checkpoint

    paths = {"delta": root / "delta", "merged": root / "merged", "peft": root / "peft", "vllm": root / "vllm"}
    config = CompressionConfig(rank=rank)
    report = compress_checkpoint(workload.base_dir, workload.finetuned_dir, paths["delta"], config)
    print(f"delta at r = {rank}: {report.bytes_written:,} bytes", flush=True)
    reconstruct_checkpoint(workload.base_dir, paths["delta"], paths["merged"])
    for profile in ("peft", "vllm"):
        exported = export_adapter(workload.base_dir, paths["delta"], paths[profile], profile=profile)
        size = sum(p.stat().st_size for p in paths[profile].iterdir())
        print(f"{profile} adapter: rank {exported.rank}, {exported.lora_modules} LoRA modules, {size:,} bytes, "
              f"{len(exported.left_out)} tensors left out", flush=True)
    return paths


def accuracy(workload, paths: dict[str, Path]) -> list[tuple[str, float]]:
    """Eval ``acc`` of the fine-tune served each way (the full fine-tune's as recorded at build)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workloads.lm_evaluate import score_choices
    from workloads.task_rows import read_task_rows

    tokenizer = AutoTokenizer.from_pretrained(workload.base_dir)
    rows = read_task_rows(workload.eval_path)

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    results = [("base", workload.scores["base"]["eval"]["acc"]),
               ("full fine-tune", workload.scores["finetuned"]["eval"]["acc"]),
               ("merged (reconstruct)", score_choices(load(paths["merged"]), tokenizer, rows).acc)]
    for profile in ("peft", "vllm"):
        served = peft.PeftModel.from_pretrained(load(workload.base_dir), paths[profile]).eval()
        results.append((f"{profile}-profile adapter", score_choices(served, tokenizer, rows).acc))
    return results


def hold(kind: str, count: int, paths: dict[str, Path], base: Path, prompts: Path) -> dict[str, float]:
    """In this process: hold ``count`` fine-tunes the ``kind`` way, run forward batches, report."""
    import peft
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()][: BATCH_ROWS * BATCHES]
    batches = [tokenizer(texts[i : i + BATCH_ROWS], return_tensors="pt", padding=True)
               for i in range(0, len(texts), BATCH_ROWS)]
    started = time.perf_counter()
    if kind == "adapters":
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), copy(paths["vllm"], 0),
                                               adapter_name="a0").eval()
        for i in range(1, count):
            model.load_adapter(copy(paths["vllm"], i), adapter_name=f"a{i}")
        models = [model] * count
    else:
        models = [AutoModelForCausalLM.from_pretrained(copy(paths["merged"], i)).eval() for i in range(count)]
    load_seconds = time.perf_counter() - started
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode():
        for i, batch in enumerate(batches):
            chosen = i % count
            if kind == "adapters":
                models[chosen].set_adapter(f"a{chosen}")
            models[chosen](**batch)
            tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - started
    rss = psutil.Process().memory_info().rss / MIB  # the models are all still held here
    return {"rss_mib": rss, "tokens_per_s": tokens / seconds, "load_s": load_seconds}


def copy(export: Path, number: int) -> Path:
    """The ``number``-th of the separate copies of ``export`` that :func:`make_copies` wrote."""
    return export.with_name(f"{export.name}-{number}")


def make_copies(paths: dict[str, Path], count: int) -> None:
    for name in ("merged", "vllm"):
        for number in range(count):
            shutil.copytree(paths[name], copy(paths[name], number))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="smollm2-sst2")
    parser.add_argument("--rank", type=float, default=1)
    parser.add_argument("--adapters", default="1,4,16", help="how many fine-tunes to hold at once")
    parser.add_argument("--hold", nargs=3, metavar=("KIND", "N", "DIR"), help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    from workloads.lm_build import load_lm_workload

    workload = load_lm_workload(args.workload)
    if args.hold:
        kind, count, root = args.hold[0], int(args.hold[1]), Path(args.hold[2])
        paths = {name: root / name for name in ("merged", "vllm")}
        print(json.dumps(hold(kind, count, paths, workload.base_dir, workload.eval_path)))
        return
    with tempfile.TemporaryDirectory(prefix="osd-serving-") as tmp:
        paths = prepare(workload, args.rank, Path(tmp))
        print(f"\n**{args.workload}**, eval split, default settings at r = {args.rank}\n")
        print("| served as | acc |\n|---|---:|")
        for name, value in accuracy(workload, paths):
            print(f"| {name} | {value:.4f} |", flush=True)
        counts = [int(n) for n in args.adapters.split(",")]
        make_copies(paths, max(counts))
        print("\n| fine-tunes held | way | resident MiB | forward tokens/s | load s |\n|---:|---|---:|---:|---:|")
        for count in counts:
            for kind in ("adapters", "merged"):
                out = subprocess.run([sys.executable, __file__, "--workload", args.workload, "--hold", kind,
                                      str(count), tmp], capture_output=True, text=True, check=True, cwd=ROOT)
                got = json.loads(out.stdout.strip().splitlines()[-1])
                way = "one base + N vllm-profile adapters" if kind == "adapters" else "N merged checkpoints"
                print(f"| {count} | {way} | {got['rss_mib']:,.0f} | {got['tokens_per_s']:,.0f} | "
                      f"{got['load_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
