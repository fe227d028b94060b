"""Norms and error reports stay exact at LLM sizes, where float32 accumulation does not."""

from __future__ import annotations

import math

import pytest
import torch

from osd_core.compress import EXPANSION_FLOOR, relative_error
from osd_core.config import CompressionConfig
from osd_core.factorize import compress_matrix
from osd_core.norms import ROW, squared_norm


def reference(tensor: torch.Tensor) -> float:
    return float(tensor.double().square().sum())


def test_squared_norm_is_exact_where_float32_vector_norm_drifts() -> None:
    values = torch.randn(8192, 4096, generator=torch.Generator().manual_seed(0)) * 1e-3
    exact = reference(values)
    naive = float(torch.linalg.vector_norm(values)) ** 2
    assert abs(naive - exact) / exact > 1e-4  # the bias this module exists for: it grows with the tensor
    assert squared_norm(values) == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize("shape", [(0,), (7,), (ROW + 3,), (3, ROW - 1), (5, 2, 3)])
def test_squared_norm_counts_every_value_of_any_shape(shape: tuple[int, ...]) -> None:
    values = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert squared_norm(values) == pytest.approx(reference(values), rel=1e-6, abs=1e-12)
    narrow = values.to(torch.bfloat16)
    assert squared_norm(narrow) == pytest.approx(reference(narrow), rel=1e-5, abs=1e-12)


def test_squared_norm_of_a_non_contiguous_view() -> None:
    values = torch.randn(300, 500, generator=torch.Generator().manual_seed(2)).T
    assert squared_norm(values) == pytest.approx(reference(values), rel=1e-6)


@pytest.mark.parametrize("noise", [1e-2, 5e-4, 3e-5, 1e-6])  # errors from near 1 to far below EXPANSION_FLOOR
@pytest.mark.parametrize("method", ["truncsvd", "magtruncsvd"])
def test_relative_error_matches_a_float64_reference(noise: float, method: str) -> None:
    g = torch.Generator().manual_seed(3)
    n, d = 3000, 1024
    low_rank = (torch.randn(n, 16, generator=g) * torch.logspace(0, -1.5, 16)) @ torch.randn(16, d, generator=g)
    delta = low_rank / (n * d) ** 0.5 + noise * torch.randn(n, d, generator=g)
    layer = compress_matrix("w", delta.clone(), CompressionConfig(method=method, rank=16))
    u, v = layer.factors()
    exact = math.sqrt(reference(delta.double() - u.double() @ v.double().T) / reference(delta))
    assert relative_error(delta, layer) == pytest.approx(exact, rel=1e-6)


def test_both_branches_of_the_error_report_are_exercised() -> None:
    """The expansion serves large errors and the exact block sum small ones; each case above lands in one."""
    g = torch.Generator().manual_seed(4)
    u, v = torch.randn(500, 4, generator=g), torch.randn(300, 4, generator=g)
    for noise, expanded in ((1.0, True), (1e-5, False)):
        delta = u @ v.T + noise * torch.randn(500, 300, generator=g)
        layer = compress_matrix("w", delta.clone(), CompressionConfig(method="truncsvd", rank=4, extra_rank=0))
        assert (relative_error(delta, layer) ** 2 >= EXPANSION_FLOOR) is expanded
