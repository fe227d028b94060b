"""The blocked float32 delta equals torch's own subtraction, and its summary the passes it replaced."""

from __future__ import annotations

import math

import pytest
import torch

from osd_core.finite import value_range
from osd_core.float_delta import BLOCK, float_difference
from osd_core.norms import squared_norm

# More entries than two blocks, and not a whole number of norm rows: every loop edge is walked.
SHAPE = (1031, 1029)


def pair(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=generator).to(dtype)
    return (base.float() + 1e-2 * torch.randn(SHAPE, generator=generator)).to(dtype), base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_blocked_delta_is_bit_for_bit_the_subtraction_and_its_summary_the_separate_passes(dtype):
    assert math.prod(SHAPE) > 2 * BLOCK
    tuned, base = pair(dtype)
    out = torch.empty(SHAPE)
    delta, summary = float_difference(tuned, base, out)
    expected = tuned.float() - base.float()
    assert delta.data_ptr() == out.data_ptr() and torch.equal(delta, expected)
    assert (summary.low, summary.high) == value_range(expected)
    assert summary.squared_norm == pytest.approx(squared_norm(expected), rel=1e-9)
    assert summary.squared_norm == pytest.approx(float(expected.double().square().sum()), rel=1e-6)
    assert summary.finite and not summary.zero


def test_a_float32_fine_tune_becomes_its_delta_in_place():
    tuned, base = pair(torch.float32)
    expected = tuned - base.bfloat16().float()
    delta, summary = float_difference(tuned, base.bfloat16())
    assert delta.data_ptr() == tuned.data_ptr() and torch.equal(delta, expected)
    assert summary.squared_norm == pytest.approx(squared_norm(expected), rel=1e-9)


@pytest.mark.parametrize("where", [0, BLOCK + 17, math.prod(SHAPE) - 1])  # first block, a middle one, the tail
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_entry_anywhere_shows_in_the_summary(where, bad):
    tuned, base = pair(torch.bfloat16)
    tuned.view(-1)[where] = bad
    _, summary = float_difference(tuned, base)
    assert not summary.finite
    assert math.isnan(summary.low) == math.isnan(summary.high) == math.isnan(bad)


def test_equal_tensors_give_a_zero_summary():
    tuned, _ = pair(torch.bfloat16)
    _, summary = float_difference(tuned, tuned.clone())
    assert summary.zero and summary.squared_norm == 0.0


def test_shapes_of_one_size_but_not_one_shape_are_refused_not_flattened():
    tuned, base = pair(torch.bfloat16)
    with pytest.raises(RuntimeError):
        float_difference(tuned, base.reshape(SHAPE[1], SHAPE[0]))
