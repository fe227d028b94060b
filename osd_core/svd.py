"""Truncated SVD of a layer delta, exact or randomized, on CPU or GPU.

The SVD is the cost of compression. For ``k`` much smaller than ``min(n, d)`` a randomized range
finder with power iterations (Halko, Martinsson & Tropp 2011) is far cheaper than a full SVD and,
with a few power iterations, accurate to well within what masking later discards; its accuracy
against the exact SVD is tested and benchmarked (``bench/svd_speed.py``). The random sketch is
drawn from an explicit seeded generator so results are reproducible run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError

# Randomized SVD pays off once the sketch (k + oversample) is well below min(n, d); measured in
# bench/svd_speed.py, below this ratio exact LAPACK SVD is as fast and always exact.
RANDOMIZED_MAX_FRACTION = 0.25


@dataclass(frozen=True)
class Factors:
    """``delta ≈ u @ diag(s) @ v.T`` with ``u`` n×k and ``v`` d×k, columns orthonormal."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def truncated_svd(
    a: torch.Tensor,
    k: int,
    *,
    method: str = "auto",
    oversample: int = 8,
    power_iters: int = 4,
    seed: int = 0,
) -> Factors:
    """The top-``k`` singular triplets of ``a`` in float32, with a deterministic sign convention.

    ``method`` is ``"exact"``, ``"randomized"`` or ``"auto"`` (randomized when the sketch is at
    most ``RANDOMIZED_MAX_FRACTION`` of ``min(n, d)``).
    """
    if a.ndim != 2:
        raise ConfigError(f"truncated_svd needs a 2-D matrix, got shape {tuple(a.shape)}")
    n, d = a.shape
    if not 1 <= k <= min(n, d):
        raise ConfigError(f"rank k must lie in [1, min(n, d) = {min(n, d)}] for a {n}x{d} matrix, got {k}")
    if method not in ("auto", "exact", "randomized"):
        raise ConfigError(f"svd method must be 'auto', 'exact' or 'randomized', got {method!r}")
    a = a.to(torch.float32)
    sketch = min(k + oversample, min(n, d))
    if method == "auto":
        method = "randomized" if sketch <= RANDOMIZED_MAX_FRACTION * min(n, d) else "exact"
    with torch.no_grad():
        if method == "exact":
            u, s, vh = torch.linalg.svd(a, full_matrices=False)
            u, s, v = u[:, :k], s[:k], vh[:k].T
        else:
            u, s, v = _randomized_svd(a, k, sketch, power_iters, seed)
        return _fix_signs(u.contiguous(), s.contiguous(), v.contiguous())


def _randomized_svd(
    a: torch.Tensor, k: int, sketch: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=a.device).manual_seed(seed)
    omega = torch.randn(a.shape[1], sketch, generator=generator, device=a.device, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):  # re-orthonormalise each half-step: keeps small singular values
        q, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ q)
    ub, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k].T


def _fix_signs(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> Factors:
    """Flip each singular pair so the largest-magnitude entry of ``u``'s column is positive.

    SVD signs are arbitrary; fixing them makes exact and randomized results comparable and the
    compressed bytes independent of the solver's whims.
    """
    pivot = u.gather(0, u.abs().argmax(dim=0, keepdim=True)).sign()
    pivot = torch.where(pivot == 0, torch.ones_like(pivot), pivot)
    return Factors(u * pivot, s, v * pivot)
