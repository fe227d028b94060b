"""Compress one delta matrix with one method under the per-layer bit budget.

This is the paper's method and its baselines, each a few lines over shared pieces (budget counts,
truncated SVD, top-s masks), so they differ only where the methods differ:

- ``truncsvd``: rank r, dense factors; its cost defines the budget B = 32·r·(n+d).
- ``magtruncsvd``: rank k = r + c, keep the largest-magnitude entries of both factors.
- ``osd``: rank k, keep the entries with the largest first-order Taylor estimate of the loss
  change caused by zeroing them: ``|U ⊙ (G·V)|`` and ``|V ⊙ (Gᵀ·U)|`` for the layer gradient G.
- ``sparse``: keep the largest-magnitude entries of the delta itself.
"""

from __future__ import annotations

import torch

from .budget import equal_density_counts, factored_bits, joint_counts, layer_budget, sparse_bits, sparse_count
from .config import CompressionConfig
from .errors import CheckpointError, ConfigError
from .layer import CompressedLayer, index_dtype
from .svd import Factors, truncated_svd


def compress_matrix(
    name: str,
    delta: torch.Tensor,
    config: CompressionConfig,
    grad: torch.Tensor | None = None,
    *,
    budget_bits: int | None = None,
    device: torch.device | str = "cpu",
) -> CompressedLayer:
    """Compress the 2-D ``delta`` of tensor ``name`` within ``32·rank·(n+d)`` paper bits.

    ``grad`` is the task-loss gradient with respect to this weight (same shape), required by
    ``osd``. ``budget_bits`` overrides the uniform per-layer budget (a model-level allocator
    spends bits unevenly). Work runs on ``device`` (a GPU when available); the record is
    returned on the CPU.
    """
    if delta.ndim != 2:
        raise ConfigError(f"{name}: only 2-D matrices are factorised, got shape {tuple(delta.shape)}")
    n, d = delta.shape
    budget = layer_budget(n, d, config.rank) if budget_bits is None else budget_bits
    if config.method != "sparse" and config.k > min(n, d):
        raise ConfigError(
            f"{name}: rank k = {config.k} exceeds min(n, d) = {min(n, d)} of its {n}x{d} delta"
        )
    with torch.no_grad():
        delta = delta.to(device=device, dtype=torch.float32)
        _require_finite(name, "delta", delta)
        if not bool(delta.any()):
            return CompressedLayer(name, "zero", (n, d), budget_bits=budget)
        if config.method == "sparse":
            return _sparse(name, delta, budget)
        factors = truncated_svd(
            delta, config.k, method=config.svd, power_iters=config.power_iters, seed=config.seed
        )
        u, v = split_sigma(factors, config.sigma)
        if config.method == "truncsvd":
            return _factored(name, (n, d), u, v, None, None, budget)
        if config.method == "magtruncsvd":
            score_u, score_v = u.abs(), v.abs()
        else:
            if grad is None:
                raise ConfigError(f"{name}: method 'osd' needs the layer's loss gradient; none was given")
            if tuple(grad.shape) != (n, d):
                raise CheckpointError(f"{name}: gradient has shape {tuple(grad.shape)}, expected {(n, d)}")
            grad = grad.to(device=device, dtype=torch.float32)
            _require_finite(name, "gradient", grad)
            score_u, score_v = taylor_scores(u, v, grad)
        if config.allocation == "joint":
            s_u, s_v = joint_counts(score_u.cpu(), score_v.cpu(), budget)
        else:
            s_u, s_v = equal_density_counts(n, d, config.k, budget)
        return _factored(name, (n, d), u, v, _top(score_u, s_u), _top(score_v, s_v), budget)


def split_sigma(factors: Factors, placement: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the singular values into the factors: ``√Σ`` on each side, or all into ``u`` or ``v``."""
    if placement == "sqrt":
        root = factors.s.sqrt()
        return factors.u * root, factors.v * root
    if placement == "u":
        return factors.u * factors.s, factors.v
    if placement == "v":
        return factors.u, factors.v * factors.s
    raise ConfigError(f"sigma must be 'sqrt', 'u' or 'v', got {placement!r}")


def taylor_scores(u: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order loss change of zeroing each factor entry: ``|U ⊙ G·V|`` and ``|V ⊙ Gᵀ·U|``.

    With ``W = U Vᵀ``, ``∂L/∂U = G·V`` and ``∂L/∂V = Gᵀ·U``; the score of an entry is
    ``|x · ∂L/∂x|``. It is invariant to how Σ is split between the factors.
    """
    return (u * (grad @ v)).abs(), (v * (grad.T @ u)).abs()


def _top(score: torch.Tensor, count: int) -> torch.Tensor:
    """Flat positions of the ``count`` highest scores, ascending (ties broken by position)."""
    flat = score.reshape(-1)
    if count >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    order = torch.argsort(flat, descending=True, stable=True)[:count]
    return order.sort().values


def _factored(
    name: str,
    shape: tuple[int, int],
    u: torch.Tensor,
    v: torch.Tensor,
    keep_u: torch.Tensor | None,
    keep_v: torch.Tensor | None,
    budget: int,
) -> CompressedLayer:
    (n, d), k = shape, u.shape[1]
    u_index, u_values = _encode(u, keep_u)
    v_index, v_values = _encode(v, keep_v)
    s_u = u_values.numel()
    s_v = v_values.numel()
    tensors = {"u.index": u_index, "u.values": u_values, "v.index": v_index, "v.values": v_values}
    return CompressedLayer(
        name, "factored", shape, tensors, k=k, budget_bits=budget, paper_bits=factored_bits(n, d, k, s_u, s_v)
    )


def _encode(factor: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and flat positions of the kept entries; a factor kept whole stores no positions."""
    flat = factor.reshape(-1)
    if keep is None or keep.numel() == flat.numel():
        return torch.empty(0, dtype=index_dtype(flat.numel())), flat.cpu().clone()
    return keep.to(device="cpu", dtype=index_dtype(flat.numel())), flat[keep].cpu().clone()


def _sparse(name: str, delta: torch.Tensor, budget: int) -> CompressedLayer:
    n, d = delta.shape
    kept = sparse_count(n, d, budget)
    index, values = _encode(delta, _top(delta.abs(), kept))
    return CompressedLayer(
        name, "sparse", (n, d), {"index": index, "values": values}, budget_bits=budget,
        paper_bits=sparse_bits(n, d, kept),
    )


def _require_finite(name: str, what: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{name}: {what} contains {bad} NaN or Inf values; expected finite numbers")
