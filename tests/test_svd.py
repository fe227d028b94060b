"""Truncated SVD: randomized against exact, sign convention, refusals, GPU path."""

import pytest
import torch

from osd_core.errors import ConfigError
from osd_core.svd import truncated_svd


def low_rank_plus_noise(n, d, rank, noise, seed=0):
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen)
    return low + noise * torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("n,d,k", [(384, 384, 2), (1536, 384, 8), (500, 300, 16)])
def test_randomized_matches_exact(n, d, k):
    a = low_rank_plus_noise(n, d, k, 0.1)
    exact = truncated_svd(a, k, method="exact")
    approx = truncated_svd(a, k, method="randomized", power_iters=4)
    assert torch.allclose(approx.s, exact.s, rtol=1e-3)
    err_exact = torch.linalg.norm(a - exact.u * exact.s @ exact.v.T)
    err_approx = torch.linalg.norm(a - approx.u * approx.s @ approx.v.T)
    assert err_approx <= err_exact * 1.001
    # same signs by convention, so factors agree column by column
    assert torch.allclose(approx.u.abs().sum(0), exact.u.abs().sum(0), rtol=1e-2)
    assert torch.allclose(approx.u, exact.u, atol=1e-2)


def test_randomized_is_near_optimal_on_a_flat_spectrum():
    a = low_rank_plus_noise(500, 300, 32, 0.1)  # 32 similar singular values, asked for 16
    exact = truncated_svd(a, 16, method="exact")
    approx = truncated_svd(a, 16, method="randomized", power_iters=4)
    err_exact = torch.linalg.norm(a - exact.u * exact.s @ exact.v.T)
    assert torch.linalg.norm(a - approx.u * approx.s @ approx.v.T) <= err_exact * 1.01


def test_randomized_is_deterministic_for_a_seed():
    a = low_rank_plus_noise(200, 100, 5, 0.5)
    one, two = truncated_svd(a, 3, method="randomized", seed=7), truncated_svd(a, 3, method="randomized", seed=7)
    assert torch.equal(one.u, two.u) and torch.equal(one.v, two.v)


def test_orthonormal_columns_and_descending_values():
    f = truncated_svd(low_rank_plus_noise(300, 200, 10, 0.1), 6)
    assert torch.allclose(f.u.T @ f.u, torch.eye(6), atol=1e-4)
    assert torch.allclose(f.v.T @ f.v, torch.eye(6), atol=1e-4)
    assert bool((f.s[:-1] >= f.s[1:]).all())


@pytest.mark.parametrize("k", [0, -1, 5])
def test_rank_outside_matrix_is_refused(k):
    with pytest.raises(ConfigError, match="rank k must lie in"):
        truncated_svd(torch.ones(4, 6), k)


def test_zero_matrix_gives_zero_values():
    f = truncated_svd(torch.zeros(50, 40), 3, method="randomized")
    assert torch.isfinite(f.u).all() and float(f.s.abs().max()) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu():
    a = low_rank_plus_noise(1024, 512, 8, 0.1)
    cpu = truncated_svd(a, 8, method="randomized")
    gpu = truncated_svd(a.cuda(), 8, method="randomized")
    assert torch.allclose(gpu.s.cpu(), cpu.s, rtol=1e-3)
    assert torch.allclose((gpu.u * gpu.s @ gpu.v.T).cpu(), cpu.u * cpu.s @ cpu.v.T, atol=1e-3)
