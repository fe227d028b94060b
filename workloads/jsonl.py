"""Rows of labelled text as JSONL: the one on-disk format for calibration and evaluation data.

JSONL keeps the files greppable and diffable, streams line by line, and needs no pandas or
pyarrow in the environments that only evaluate. Reading validates every line, because a bad
label silently lowers accuracy instead of failing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypedDict

from workloads.errors import DataFormatError


class Row(TypedDict):
    """One labelled example: ``label`` is a class index in ``[0, num_labels)``."""

    text: str
    label: int


def write_jsonl(rows: Iterable[Row], path: Path) -> int:
    """Write ``rows`` to ``path`` (UTF-8, one JSON object per line); return the row count.

    Keys are written in a fixed order so the bytes depend only on the rows.
    """
    count = 0
    with Path(path).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(
                json.dumps({"text": row["text"], "label": row["label"]}, ensure_ascii=False)
            )
            handle.write("\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike[str], num_labels: int | None = None) -> list[Row]:
    """Read and validate rows written by :func:`write_jsonl`.

    Raises :class:`DataFormatError` naming the file (and line) for a missing or empty file, a
    line that is not a JSON object with a string ``text`` and an integer ``label``, or (when
    ``num_labels`` is given) a label outside ``[0, num_labels)``. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    rows: list[Row] = []
    with path.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            rows.append(_parse_line(line, path, line_no, num_labels))
    if not rows:
        raise DataFormatError(f"{path}: file has no rows")
    return rows


def json_object(line: str, where: str) -> dict:
    """One JSONL line as a JSON object, or a :class:`DataFormatError` naming ``where`` (file:line)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_line(line: str, path: Path, line_no: int, num_labels: int | None) -> Row:
    where = f"{path}:{line_no}"
    obj = json_object(line, where)
    text, label = obj.get("text"), obj.get("label")
    if not isinstance(text, str):
        raise DataFormatError(f"{where}: 'text' must be a string, got {text!r}")
    # bool is an int subclass; a true/false label is a bug upstream, not class 1/0.
    if not isinstance(label, int) or isinstance(label, bool):
        raise DataFormatError(f"{where}: 'label' must be an integer, got {label!r}")
    if num_labels is not None and not 0 <= label < num_labels:
        raise DataFormatError(f"{where}: label {label} is outside [0, {num_labels})")
    return Row(text=text, label=label)
