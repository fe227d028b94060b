"""The one evaluator: a checkpoint's score on a JSONL file, by its task and the rows' shape.

A sequence classifier on ``{text, label}`` rows: accuracy (and macro-F1). A causal LM on
``{prompt, choices, label}`` rows: log-likelihood accuracy ``acc`` (and ``acc_norm``); on any other
language-model rows: perplexity (``workloads.lm_evaluate``). The same function scores the base,
the fine-tune and every reconstruction from compressed deltas, so compression results are
comparable only if this stays the single evaluator.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from workloads.errors import DataFormatError, ModelFormatError, WorkloadError
from workloads.jsonl import Row, read_jsonl
from workloads.lm_evaluate import perplexity, score_choices
from workloads.task_rows import CHOICE, HIGHER_IS_BETTER, is_causal_lm, read_rows_for



@dataclass(frozen=True)
class Score:
    """A checkpoint's primary score on a file, its direction, and the other numbers measured beside it."""

    metric: str
    value: float
    n: int
    seconds: float
    extra: dict[str, float | int] = field(default_factory=dict)
    correct: tuple[bool, ...] = field(default=(), repr=False, compare=False)  # per row, for accuracy metrics
    losses: tuple[float, ...] = field(default=(), repr=False, compare=False)  # per row, for ``choice_loss``

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric]


@dataclass(frozen=True)
class EvalResult:
    """Scores on ``n`` rows; ``seconds`` is the wall time of the forward passes. ``correct`` says,
    row by row in file order, whether the prediction was right: what paired comparisons of two
    models on the same rows need (``bench/quality.py`` reports their differences with intervals)."""

    accuracy: float
    macro_f1: float
    n: int
    seconds: float
    correct: tuple[bool, ...] = field(default=(), repr=False, compare=False)

    def scores(self) -> dict[str, float | int]:
        """The summary numbers, as workloads record them (without the per-row outcomes)."""
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "n": self.n, "seconds": self.seconds}


def macro_f1(labels: Sequence[int] | np.ndarray, preds: Sequence[int] | np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``labels`` or ``preds``.

    A class with no true and no predicted rows would be 0/0; like scikit-learn's default we
    leave it out, and a class with precision + recall = 0 scores F1 = 0.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(preds, dtype=np.int64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels and preds must be 1-D of one length, got {y.shape} and {p.shape}")
    if y.size == 0:
        raise ValueError("macro_f1 needs at least one row")
    scores = []
    for cls in np.union1d(y, p):
        tp = np.sum((p == cls) & (y == cls))
        fp = np.sum((p == cls) & (y != cls))
        fn = np.sum((p != cls) & (y == cls))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Row],
    *,
    batch_size: int = 64,
    max_length: int = 64,
    progress: bool = True,
    desc: str = "evaluate",
) -> EvalResult:
    """Score an in-memory model on ``rows``; the model's train/eval mode is restored after.

    Rows are batched longest first so each batch pads to similar lengths and little compute goes
    to padding; the order does not change any score.
    """
    if not rows:
        raise ValueError("evaluate_model needs at least one row")
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
    num_labels = model.config.num_labels
    if not num_labels:
        raise WorkloadError(f"{type(model).__name__}: config has no num_labels; not a classifier")
    for index, row in enumerate(rows):
        if not 0 <= row["label"] < num_labels:
            raise DataFormatError(
                f"row {index}: label {row['label']} is outside [0, {num_labels}) of the model"
            )
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]), reverse=True)
    device = next(model.parameters()).device
    preds = np.empty(len(rows), dtype=np.int64)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for lo in tqdm(
                range(0, len(order), batch_size),
                desc=desc,
                unit="batch",
                disable=not progress,
                leave=False,
            ):
                batch = order[lo : lo + batch_size]
                inputs = tokenizer(
                    [rows[i]["text"] for i in batch],
                    truncation=True,
                    max_length=max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(device)
                preds[batch] = model(**inputs).logits.argmax(dim=-1).cpu().numpy()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    labels = np.fromiter((row["label"] for row in rows), dtype=np.int64, count=len(rows))
    return EvalResult(
        accuracy=float(np.mean(preds == labels)),
        macro_f1=macro_f1(labels, preds),
        n=len(rows),
        seconds=seconds,
        correct=tuple(bool(c) for c in preds == labels),
    )


def evaluate_checkpoint(
    model_dir: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    batch_size: int = 64,
    max_length: int = 64,
    progress: bool = True,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> EvalResult:
    """Load a saved checkpoint (safetensors only, no hub access) and score it on a JSONL file.

    The tokenizer comes from ``model_dir`` when it has one, else from ``tokenizer_dir``:
    reconstructed checkpoints may be written without tokenizer files.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise WorkloadError(f"{model_dir}: not a checkpoint directory (no config.json)")
    if not any(model_dir.glob("*.safetensors")):
        raise WorkloadError(f"{model_dir}: no *.safetensors weights (other formats are refused)")
    # Validate the data against the config before paying for the model load.
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelFormatError(
            f"{model_dir / 'config.json'}: not a usable model configuration ({_first_line(exc)})"
        ) from None
    rows = read_jsonl(data_path, num_labels=config.num_labels)
    tokenizer = AutoTokenizer.from_pretrained(
        _tokenizer_source(model_dir, tokenizer_dir), local_files_only=True
    )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, config=config, use_safetensors=True, local_files_only=True
        )
    except (RuntimeError, ValueError) as exc:  # e.g. num_labels in config.json disagrees with the head's rows
        raise ModelFormatError(
            f"{model_dir}: the weights do not fit config.json as a sequence classifier with "
            f"{config.num_labels} labels ({_first_line(exc)})"
        ) from None
    return evaluate_model(
        model,
        tokenizer,
        rows,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
        desc=f"evaluate {model_dir.name}",
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _tokenizer_source(model_dir: Path, tokenizer_dir: str | os.PathLike[str] | None) -> Path:
    if any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        return model_dir
    if tokenizer_dir is None:
        raise WorkloadError(
            f"{model_dir}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); pass tokenizer_dir"
        )
    return Path(tokenizer_dir)


def score_checkpoint(
    model_dir: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    progress: bool = True,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> Score:
    """Score a saved checkpoint on a JSONL file with the scorer its task and the rows' shape call for.

    ``batch_size`` and ``max_length`` default per task: 64 rows of 64 tokens for a classifier,
    16 of 256 for a causal LM (its rows are prompts with answers).
    """
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{config_file}: not a usable model configuration ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{config_file}: not a usable model configuration (not a JSON object)")
    if not is_causal_lm(config):
        result = evaluate_checkpoint(model_dir, data_path, batch_size=batch_size or 64, max_length=max_length or 64,
                                     progress=progress, tokenizer_dir=tokenizer_dir)
        return Score("accuracy", result.accuracy, result.n, result.seconds, {"macro_f1": result.macro_f1},
                     result.correct)
    rows = read_rows_for(data_path, config)
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(model_dir, tokenizer_dir), local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                     dtype=torch.float32)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelFormatError(f"{model_dir}: the weights do not load as a causal LM ({_first_line(exc)})") from None
    sizes = {"batch_size": batch_size or 16, "max_length": max_length or 256}
    if rows.kind == CHOICE:
        choices = score_choices(model, tokenizer, rows, **sizes)
        return Score("acc", choices.acc, choices.n, choices.seconds,
                     {"acc_norm": choices.acc_norm, "choice_loss": choices.choice_loss},
                     choices.correct, choices.losses)
    measured = perplexity(model, tokenizer, rows, **sizes)
    return Score("perplexity", measured.perplexity, measured.n, measured.seconds, {"tokens": measured.tokens})

