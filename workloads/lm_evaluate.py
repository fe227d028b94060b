"""Scores of a causal language model: multiple-choice accuracy by log-likelihood, and perplexity.

Defined as lm-evaluation-harness defines them, so a catalog's numbers read like the field's:

- ``acc``: a row is right when its labelled choice has the highest log-likelihood after the
  prompt; ``acc_norm``: the same with each log-likelihood divided by the choice's length in
  characters (lm-evaluation-harness's ``acc_norm``), which stops long choices from losing by length;
- ``choice_loss``: the mean over rows of −log of the labelled choice's probability among the row's
  choices (the softmax of their log-likelihoods), in nats. Not one of the harness's scores: it is
  here because it is continuous. Two models that get the same rows right or wrong tie on ``acc``
  however far apart their answers' probabilities are; on a few hundred rows, where a fine-tune
  gains a few points of ``acc``, only this loss separates close compressions of it;
- ``perplexity``: ``exp`` of the mean negative log-likelihood per scored token over all rows
  (token-weighted, as a corpus perplexity), lower is better.

Batches are sorted longest first so they pad little; no score depends on the order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workloads.errors import DataFormatError
from workloads.task_rows import CHOICE, TaskRows, encode_pairs, lm_pairs, token_logprobs


@dataclass(frozen=True)
class ChoiceScores:
    """``acc``, ``acc_norm`` and ``choice_loss`` on ``n`` rows, with each row's outcome and loss
    for paired comparisons."""

    acc: float
    acc_norm: float
    choice_loss: float
    n: int
    seconds: float
    correct: tuple[bool, ...] = field(default=(), repr=False, compare=False)
    losses: tuple[float, ...] = field(default=(), repr=False, compare=False)


@dataclass(frozen=True)
class Perplexity:
    """Corpus perplexity over ``tokens`` scored tokens of ``n`` rows."""

    perplexity: float
    tokens: int
    n: int
    seconds: float


def score_choices(model: Any, tokenizer: Any, rows: TaskRows, *, batch_size: int = 16, max_length: int = 256
                  ) -> ChoiceScores:
    """Multiple-choice ``acc`` and ``acc_norm`` of ``model`` on ``{prompt, choices, label}`` rows."""
    if rows.kind != CHOICE:
        raise DataFormatError(f"{rows.path}: multiple-choice scoring needs {{prompt, choices, label}} rows")
    requests = [(number, choice) for number, row in enumerate(rows.rows) for choice in range(len(row["choices"]))]
    pairs = [(rows.rows[number]["prompt"], rows.rows[number]["choices"][choice]) for number, choice in requests]
    started = time.perf_counter()
    loglik = _logliks(model, tokenizer, pairs, batch_size, max_length)[0]
    right, right_norm, losses = [], [], []
    for number, row in enumerate(rows.rows):
        picks = [loglik[i] for i, (n, _) in enumerate(requests) if n == number]
        lengths = [len(choice) for choice in row["choices"]]
        right.append(max(range(len(picks)), key=picks.__getitem__) == row["label"])
        right_norm.append(max(range(len(picks)), key=lambda c: picks[c] / lengths[c]) == row["label"])
        losses.append(_logsumexp(picks) - picks[row["label"]])
    n = len(rows.rows)
    return ChoiceScores(sum(right) / n, sum(right_norm) / n, sum(losses) / n, n, time.perf_counter() - started,
                        tuple(right), tuple(losses))


def perplexity(model: Any, tokenizer: Any, rows: TaskRows, *, batch_size: int = 16, max_length: int = 256
               ) -> Perplexity:
    """Token-weighted perplexity of ``model`` on the continuation tokens of every row."""
    started = time.perf_counter()
    loglik, counts = _logliks(model, tokenizer, lm_pairs(rows, tokenizer), batch_size, max_length)
    tokens = int(sum(counts))
    if tokens == 0:
        raise DataFormatError(f"{rows.path}: no row has a token to score (each needs at least two tokens)")
    return Perplexity(math.exp(-sum(loglik) / tokens), tokens, len(rows.rows), time.perf_counter() - started)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(value - top) for value in values))


def _logliks(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int, max_length: int
             ) -> tuple[list[float], list[int]]:
    """Summed log-likelihood and scored-token count of each pair's continuation, in input order."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
    loglik, counts = [0.0] * len(pairs), [0] * len(pairs)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for lo in range(0, len(order), batch_size):
                chunk = order[lo : lo + batch_size]
                batch = encode_pairs(tokenizer, [pairs[i] for i in chunk], max_length)
                sums, scored = token_logprobs(model, batch.to(device))
                for i, value, count in zip(chunk, sums.tolist(), scored.tolist(), strict=True):
                    loglik[i], counts[i] = value, count
    finally:
        model.train(was_training)
    return loglik, counts
