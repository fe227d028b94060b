"""The fine-tuning loop behind every workload: plain AdamW on shuffled mini-batches.

Kept free of ``transformers.Trainer`` so the step count, batch order and RNG use are exactly
what the recipe (and so the cache key) says, with nothing read from the environment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workloads.jsonl import Row
from workloads.recipes import Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """Mean loss over the last 10% of steps (less noisy than the final batch) and wall time."""

    final_loss: float
    seconds: float


def fine_tune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Row],
    recipe: Recipe,
    *,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``rows`` as ``recipe`` says; leave it in eval mode.

    Batch order comes from an explicit generator seeded with ``recipe.seed``; dropout draws from
    torch's global generator, which is seeded inside ``fork_rng`` so the caller's RNG state is
    left as it was.
    """
    if not rows:
        raise ValueError(f"workload {recipe.name!r}: no training rows")
    if recipe.freeze_embeddings:
        model.base_model.embeddings.requires_grad_(False)
    optimizer = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr)
    warmup = int(recipe.warmup_ratio * recipe.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_decay(step, warmup, recipe.steps)
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    tail = max(1, recipe.steps // 10)
    tail_losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model.train()
        bar = tqdm(
            batch_indices(len(rows), recipe.batch_size, recipe.steps, generator),
            total=recipe.steps,
            desc=f"fine-tune {recipe.name}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        for step, batch in enumerate(bar):
            inputs = tokenizer(
                [rows[i]["text"] for i in batch],
                truncation=True,
                max_length=recipe.max_length,
                padding=True,
                return_tensors="pt",
            )
            labels = torch.tensor([rows[i]["label"] for i in batch])
            loss_tensor = model(**inputs, labels=labels).loss
            loss_tensor.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_tensor.item()
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if step >= recipe.steps - tail:
                tail_losses.append(loss)
            if (step + 1) % tail == 0:  # ten log lines per run, for logs written without a bar
                log.info(
                    "fine-tune %s: step %d/%d, loss %.4f, %.0f s",
                    recipe.name,
                    step + 1,
                    recipe.steps,
                    loss,
                    time.perf_counter() - start,
                )
        model.eval()
    return TrainResult(
        final_loss=sum(tail_losses) / len(tail_losses), seconds=time.perf_counter() - start
    )


def _param_groups(model: PreTrainedModel, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (the 1-D tensors), as in BERT."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def batch_indices(
    n: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """``steps`` batches of row indices, walking fresh permutations epoch after epoch."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order.extend(torch.randperm(n, generator=generator).tolist())
        batch, order = order[:batch_size], order[batch_size:]
        yield batch
