"""Argument types shared by the command modules: each turns bad text into argparse's usage error."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _integer_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _integer_at_least(text, 1)


def whole_number(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    return _integer_at_least(text, 0)


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def number(text: str) -> int | float:
    """A number as typed, such as a budget rank: ``2`` stays an integer, ``0.5`` is a fraction."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def comma_list(item: Callable[[str], T]) -> Callable[[str], tuple[T, ...]]:
    """An argparse type: ``"1,2,4"`` → ``(1, 2, 4)``, each item converted by ``item``."""

    def convert(text: str) -> tuple[T, ...]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list of at least one value")
        try:
            return tuple(item(part) for part in items)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    convert.__name__ = f"list of {getattr(item, '__name__', 'values')}"
    return convert
