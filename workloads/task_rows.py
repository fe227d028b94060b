"""The row shapes of calibration and evaluation files, and how a causal LM reads them.

One JSONL file holds rows of one shape, recognised by its keys:

- ``{"text", "label"}``: a labelled example for a sequence classifier (``workloads.jsonl``);
- ``{"text"}``: plain text; a causal LM's loss (and perplexity) counts every token;
- ``{"prompt", "completion"}``: the loss counts the completion's tokens only;
- ``{"messages": [{"role", "content"}, ...]}``: a chat, laid out by the tokenizer's chat template;
  the loss counts the last message, which must be the assistant's;
- ``{"prompt", "choices": [...], "label"}``: multiple choice, scored by the log-likelihood of
  each choice after the prompt; calibration uses the right choice as the completion.

A file of mixed or unknown shapes is refused, naming the file and line. For a causal LM every
shape becomes (context, continuation) pairs, and tokens of the context are masked out of the
loss, as lm-evaluation-harness does for its log-likelihood requests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workloads.errors import DataFormatError
from workloads.jsonl import json_object

CLASSIFICATION, TEXT, COMPLETION, CHAT, CHOICE = "classification", "text", "completion", "chat", "choice"
SHAPES: dict[frozenset[str], str] = {
    frozenset({"text", "label"}): CLASSIFICATION,
    frozenset({"text"}): TEXT,
    frozenset({"prompt", "completion"}): COMPLETION,
    frozenset({"messages"}): CHAT,
    frozenset({"prompt", "choices", "label"}): CHOICE,
}
IGNORE = -100  # the label torch's cross-entropy skips
HIGHER_IS_BETTER = {"accuracy": True, "acc": True, "acc_norm": True, "macro_f1": True, "perplexity": False}


@dataclass(frozen=True)
class TaskRows:
    """The rows of one file, their shape, and the line each came from."""

    path: Path
    kind: str
    rows: tuple[dict[str, Any], ...]
    lines: tuple[int, ...]

    def require(self, config: dict[str, Any]) -> TaskRows:
        """These rows, if the model of ``config`` can take them: classification rows for a sequence
        classifier, the language-model shapes for a causal LM."""
        causal = is_causal_lm(config)
        if causal and self.kind == CLASSIFICATION:
            raise DataFormatError(
                f"{self.path}:{self.lines[0]}: {{text, label}} rows are for sequence classifiers; this causal LM "
                "takes {text}, {prompt, completion}, {messages} or {prompt, choices, label} rows")
        if not causal and self.kind != CLASSIFICATION:
            raise DataFormatError(
                f"{self.path}:{self.lines[0]}: expected an object with a string 'text' and an integer 'label' "
                f"(a sequence classifier's rows), got a {self.kind} row")
        return self


def read_rows_for(path: str | os.PathLike[str], config: dict[str, Any]) -> TaskRows:
    """The rows of ``path``, checked against the model of ``config.json``: a classifier's labels
    within its classes, and a row shape its task can take."""
    classes = None if is_causal_lm(config) else config.get("num_labels") or len(config.get("id2label") or {})
    return read_task_rows(path, num_labels=classes or None).require(config)


def metric_for(config: dict[str, Any], rows: TaskRows) -> str:
    """The metric the evaluator reports for this model on these rows (``workloads.evaluate``)."""
    if not is_causal_lm(config):
        return "accuracy"
    return "acc" if rows.kind == CHOICE else "perplexity"


def is_causal_lm(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` names a causal LM class (``LlamaForCausalLM``, ``GPT2LMHeadModel``...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    return any(name in names for name in architectures)


def read_task_rows(path: str | os.PathLike[str], *, num_labels: int | None = None) -> TaskRows:
    """Read and check a JSONL file of one row shape (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataFormatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}: cannot read ({exc})") from None
    kind, rows, numbers = None, [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        row = json_object(line, where)
        shape = SHAPES.get(frozenset(row))
        if shape is None:
            known = "; ".join("{" + ", ".join(sorted(keys)) + "}" for keys in SHAPES)
            raise DataFormatError(f"{where}: keys {sorted(row)} match no row shape ({known})")
        if kind is not None and shape != kind:
            raise DataFormatError(f"{where}: a {shape} row in a file of {kind} rows; one shape per file")
        kind = shape
        _check(row, shape, where, num_labels)
        rows.append(row)
        numbers.append(number)
    if kind is None:
        raise DataFormatError(f"{path}: file holds no rows")
    return TaskRows(path, kind, tuple(rows), tuple(numbers))


def _check(row: dict[str, Any], shape: str, where: str, num_labels: int | None) -> None:
    strings = {CLASSIFICATION: ("text",), TEXT: ("text",), COMPLETION: ("prompt", "completion"), CHOICE: ("prompt",)}
    for key in strings.get(shape, ()):
        if not isinstance(row[key], str):
            raise DataFormatError(f"{where}: {key!r} must be a string, got {row[key]!r}")
    if shape == CHAT:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values())
                for m in messages)):
            raise DataFormatError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        if messages[-1]["role"] != "assistant":
            raise DataFormatError(f"{where}: the last message must be the assistant's (its tokens are the target)")
    if shape == CHOICE:
        choices = row["choices"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise DataFormatError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if shape in (CLASSIFICATION, CHOICE):
        label = row["label"]
        if not isinstance(label, int) or isinstance(label, bool):
            raise DataFormatError(f"{where}: 'label' must be an integer, got {label!r}")
        limit = len(row["choices"]) if shape == CHOICE else num_labels
        if limit is not None and not 0 <= label < limit:
            what = f"the row has {limit} choices" if shape == CHOICE else f"the model has {limit} classes"
            raise DataFormatError(f"{where}: label {label} is outside [0, {limit}): {what}")


def lm_pairs(rows: TaskRows, tokenizer: Any) -> list[tuple[str, str]]:
    """Each row as the (context, continuation) a causal LM's loss is taken on (choice rows: the right one)."""
    if rows.kind == CLASSIFICATION:
        raise DataFormatError(f"{rows.path}: {{text, label}} rows are for sequence classifiers; a causal LM "
                              "takes {text}, {prompt, completion}, {messages} or {prompt, choices, label} rows")
    pairs = []
    for row in rows.rows:
        if rows.kind == TEXT:
            pairs.append(("", row["text"]))
        elif rows.kind == COMPLETION:
            pairs.append((row["prompt"], row["completion"]))
        elif rows.kind == CHOICE:
            pairs.append((row["prompt"], row["choices"][row["label"]]))
        else:
            pairs.append(chat_pair(row["messages"], tokenizer, rows.path))
    return pairs


def chat_pair(messages: Sequence[dict[str, str]], tokenizer: Any, path: Path) -> tuple[str, str]:
    """A chat as (everything up to the assistant's turn, the assistant's last message)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataFormatError(f"{path}: chat rows need a tokenizer with a chat template; this one has none")
    context = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    return context, messages[-1]["content"]


@dataclass(frozen=True)
class LMBatch:
    """Token ids, attention mask and labels (context tokens and padding set to ``IGNORE``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> LMBatch:
    """Tokenize (context, continuation) pairs as lm-evaluation-harness does, pad them into one batch.

    The pair is encoded whole and the context alone; the continuation is what the whole has
    beyond the context, so tokens that merge across the boundary are counted once. Trailing
    whitespace of the context moves to the continuation first. Sequences longer than
    ``max_length`` lose tokens from the left: the continuation is what is scored.
    """
    encoded = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
        prefix = tokenizer(context, add_special_tokens=True)["input_ids"] if context else _specials(tokenizer)
        split = min(len(prefix), len(whole) - 1) if len(whole) > 1 else 0
        labels = [IGNORE] * split + whole[split:]
        encoded.append((whole[-max_length:], labels[-max_length:]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for row, (tokens, targets) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, : len(targets)] = torch.tensor(targets)
    return LMBatch(ids, mask, labels)


def _specials(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before any text (a BOS token, or nothing)."""
    return tokenizer("", add_special_tokens=True)["input_ids"]


def token_logprobs(model: Any, batch: LMBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are.

    Token ``t`` is predicted from the logits at ``t - 1``; the first token is never scored.
    """
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    targets = batch.labels[:, 1:]
    scored = targets != IGNORE
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(dim=1), scored.sum(dim=1)
