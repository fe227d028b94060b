"""The float32 difference of a fine-tuned and a base tensor, and its range and norm, in one pass.

Why: ``delta.sub_(base)`` with a float32 ``delta`` and a bf16 ``base`` takes torch's mixed-dtype
path, which converts element by element, and it was the largest cost after the SVD of compressing
a Llama-2-7B-shaped pair on the CPU (``bench/scale.py``: 2.8 s of a 13 s two-layer run). Widening
a block of the base into a small float32 scratch and subtracting like from like gives the same
values (bf16 and fp16 widen to float32 exactly; the subtraction is float32 either way) about five
times faster (``bench/delta_speed.py``). While each block is in cache its smallest and largest
value and its squared norm are taken too: compression needs all three (is the delta finite, is it
zero, how large is it), and they used to be three more passes over the whole delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .finite import value_range
from .norms import ROW, squared_norm

BLOCK = 1 << 19  # float32 entries a block (2 MiB): a multiple of ROW, so norms are taken as squared_norm takes them


@dataclass(frozen=True)
class DeltaSummary:
    """A delta's smallest and largest value (NaN anywhere makes both NaN) and ``‖Δ‖²_F`` (NaN
    unless every value is finite)."""

    low: float
    high: float
    squared_norm: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def zero(self) -> bool:
        return self.low == 0.0 and self.high == 0.0


def summarise(delta: torch.Tensor) -> DeltaSummary:
    """The summary of a delta already in memory, in two passes (``value_range``, ``squared_norm``)."""
    low, high = value_range(delta)
    return DeltaSummary(low, high, squared_norm(delta) if math.isfinite(low) and math.isfinite(high) else math.nan)


def float_difference(tuned: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, DeltaSummary]:
    """``tuned − base`` in float32 and its summary: in ``tuned`` itself when it is float32, else in
    ``out`` where given (float32, of ``tuned``'s shape), else in a new tensor.

    Shapes must match exactly (no broadcasting); a mismatch raises torch's own error. Blocks are
    taken on the CPU for a large contiguous pair whose base needs widening; anything else (a GPU
    pair, a small or float32 one) is subtracted whole and summarised after.
    """
    if tuned.dtype == torch.float32:
        out = tuned
    elif out is None:
        out = torch.empty(tuned.shape, dtype=torch.float32, device=tuned.device)
    if not _blockable(tuned, base, out):
        delta = (out if out is tuned else out.copy_(tuned)).sub_(base)
        return delta, summarise(delta)
    flat_out, flat_tuned, flat_base = out.view(-1), tuned.view(-1), base.view(-1)
    whole = flat_out.numel() // ROW * ROW  # summarised in ROW-entry rows; the tail apart
    rows = whole // ROW
    lows, highs, norms = torch.empty(rows), torch.empty(rows), torch.empty(rows)
    scratch = torch.empty(BLOCK, dtype=torch.float32)
    for start in range(0, flat_out.numel(), BLOCK):
        piece = flat_out[start : start + BLOCK]
        if out is not tuned:
            piece.copy_(flat_tuned[start : start + BLOCK])
        piece.sub_(scratch[: piece.numel()].copy_(flat_base[start : start + BLOCK]))
        first, last = start // ROW, min(start + BLOCK, whole) // ROW
        if last > first:
            block_rows = piece[: (last - first) * ROW].view(-1, ROW)
            torch.amin(block_rows, dim=1, out=lows[first:last])  # aminmax along rows measured 10× slower
            torch.amax(block_rows, dim=1, out=highs[first:last])
            torch.linalg.vector_norm(block_rows, dim=1, out=norms[first:last])
    parts = [DeltaSummary(float(lows.min()), float(highs.max()), float(norms.double().square().sum()))]
    if whole < flat_out.numel():
        parts.append(summarise(flat_out[whole:]))
    return out, _combined(parts)


def _combined(parts: list[DeltaSummary]) -> DeltaSummary:
    """One summary of a tensor from those of its pieces (NaN in any piece makes all NaN)."""
    if any(math.isnan(part.low) or math.isnan(part.high) for part in parts):
        return DeltaSummary(math.nan, math.nan, math.nan)
    low, high = min(part.low for part in parts), max(part.high for part in parts)
    finite = math.isfinite(low) and math.isfinite(high)
    return DeltaSummary(low, high, sum(part.squared_norm for part in parts) if finite else math.nan)


def _blockable(tuned: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the pair is walked in blocks: on the CPU, contiguous, of one shape, large, and with
    a base to widen (a float32 base is subtracted as fast whole)."""
    return (
        base.dtype != torch.float32
        and out.device.type == "cpu" and base.device.type == "cpu" and tuned.device.type == "cpu"
        and tuned.shape == base.shape == out.shape and out.numel() > BLOCK
        and tuned.is_contiguous() and base.is_contiguous() and out.is_contiguous()
    )
