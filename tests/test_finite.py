"""The fast finiteness check: a finite sum proves finite values; a non-finite one is checked exactly."""

from __future__ import annotations

import math

import pytest
import torch

from osd_core.finite import all_finite, count_non_finite, is_zero, value_range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_value_anywhere_is_found(dtype: torch.dtype, bad: float) -> None:
    values = torch.randn(257, 129).to(dtype)
    assert all_finite(values)
    for index in (0, 1000, values.numel() - 1):
        spoiled = values.clone().reshape(-1)
        spoiled[index] = bad
        assert not all_finite(spoiled) and count_non_finite(spoiled) == 1


def test_inf_and_minus_inf_together_are_found() -> None:
    values = torch.zeros(100)
    values[3], values[70] = float("inf"), float("-inf")  # their sum is NaN, not a finite cancellation
    assert not all_finite(values) and count_non_finite(values) == 2


def test_finite_values_whose_sum_overflows_are_finite() -> None:
    huge = torch.full((8,), 3e38, dtype=torch.float32)
    assert not torch.isfinite(huge.sum()) and all_finite(huge)
    assert all_finite(torch.full((4,), 60000.0, dtype=torch.float16))  # fp16's sum overflows at 65504


def test_integer_and_empty_tensors_are_finite() -> None:
    assert all_finite(torch.arange(10)) and all_finite(torch.empty(0))
    assert all_finite(torch.tensor([], dtype=torch.int8))


def test_is_zero_needs_every_value_zero() -> None:
    assert is_zero(torch.zeros(64, 32)) and is_zero(torch.tensor([-0.0, 0.0])) and is_zero(torch.empty(0))
    for spoiler in (1e-30, -1e-30, float("nan"), float("inf")):
        values = torch.zeros(64, 32)
        values[63, 31] = spoiler
        assert not is_zero(values)


def test_value_range_flags_non_finite_values_and_zero_tensors() -> None:
    assert value_range(torch.empty(0)) == (0.0, 0.0) and value_range(torch.zeros(5)) == (0.0, 0.0)
    assert value_range(torch.tensor([3.0, -2.0, 1.0])) == (-2.0, 3.0)
    low, high = value_range(torch.tensor([1.0, float("nan"), -2.0]))
    assert math.isnan(low) and math.isnan(high)
    assert value_range(torch.tensor([1.0, float("-inf")])) == (float("-inf"), 1.0)
