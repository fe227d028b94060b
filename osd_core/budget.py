"""Bit accounting: the one place that says what a layer's encoding costs.

Values default to 32 bits as in the paper; narrower values (``value_bits=16``) are a measured
option beyond the paper, charged by the same rules against the same fp32-defined budget.

Every method is charged by these functions, so methods compete under identical rules. The cost
model is the paper's (arXiv 2511.02681, as summarised in shared/OSD.md): each kept entry of a
sparse factor costs a 32-bit value plus one flat position index of ``ceil(log2(positions))`` bits.
A factor kept whole needs no positions, which is why a dense rank-r truncated SVD costs exactly
``32·r·(n+d)`` bits: that is the per-layer budget ``B``.

The real bytes of the on-disk encoding are reported separately (see ``osd_core.layer``); they
differ from these paper bits and both are shown to users.
"""

from __future__ import annotations

import math

import torch

from .errors import BudgetError, ConfigError

VALUE_BITS = 32


def index_bits(positions: int) -> int:
    """Bits of one flat index into ``positions`` slots: ``ceil(log2(positions))``."""
    if positions < 1:
        raise ConfigError(f"a tensor must have at least one position, got {positions}")
    return math.ceil(math.log2(positions))


def factor_bits(rows: int, k: int, kept: int, value_bits: int = VALUE_BITS) -> int:
    """Paper-accounted bits of an ``rows × k`` factor with ``kept`` entries kept."""
    total = rows * k
    if not 0 <= kept <= total:
        raise ConfigError(f"kept entries must lie in [0, {total}], got {kept}")
    if kept == total:
        return value_bits * kept
    return (value_bits + index_bits(total)) * kept


def factored_bits(n: int, d: int, k: int, s_u: int, s_v: int, value_bits: int = VALUE_BITS) -> int:
    """Paper bits of ``U`` (n×k, ``s_u`` kept) and ``V`` (d×k, ``s_v`` kept): the paper's ``mu``."""
    return factor_bits(n, k, s_u, value_bits) + factor_bits(d, k, s_v, value_bits)


def sparse_bits(n: int, d: int, kept: int, value_bits: int = VALUE_BITS) -> int:
    """Paper bits of ``kept`` entries of an n×d matrix stored as values plus flat indices."""
    return factor_bits(n, d, kept, value_bits)


def layer_budget(n: int, d: int, rank: int) -> int:
    """The budget ``B = 32·r·(n+d)``: what a dense fp32 rank-``rank`` factorisation costs."""
    if rank < 1:
        raise ConfigError(f"rank must be >= 1, got {rank}")
    return VALUE_BITS * rank * (n + d)


def equal_density_counts(n: int, d: int, k: int, budget: int, value_bits: int = VALUE_BITS) -> tuple[int, int]:
    """The largest equal-density counts ``(s_u, s_v)`` of a rank-``k`` factorisation within ``budget``.

    Both factors keep the same fraction of their entries. When the whole factorisation fits the
    budget densely it is kept whole (so rank ``k = r`` reproduces the truncated SVD exactly).
    """
    if factored_bits(n, d, k, n * k, d * k, value_bits) <= budget:
        return n * k, d * k
    cost_u = value_bits + index_bits(n * k)
    cost_v = value_bits + index_bits(d * k)
    density = min(budget / (n * k * cost_u + d * k * cost_v), 1.0)
    s_u, s_v = math.floor(density * n * k), math.floor(density * d * k)
    while s_u > 0 and s_v > 0 and factored_bits(n, d, k, s_u, s_v, value_bits) > budget:
        if s_u * d >= s_v * n:
            s_u -= 1
        else:
            s_v -= 1
    _require_entries(s_u, s_v, n, d, k, budget)
    return s_u, s_v


def joint_counts(
    score_u: torch.Tensor, score_v: torch.Tensor, budget: int, value_bits: int = VALUE_BITS
) -> tuple[int, int]:
    """Counts that keep the highest-scoring entries of both factors together within ``budget``.

    Scores of ``U`` and ``V`` must be commensurate (the Taylor estimates of loss change are). The
    entries are ranked jointly and taken in order while the paper bits stay within budget; the best
    entry of each factor always comes first, since a factor with nothing kept zeroes the product.
    When the whole factorisation fits it is kept whole.
    """
    (n, k), (d, _) = score_u.shape, score_v.shape
    if factored_bits(n, d, k, n * k, d * k, value_bits) <= budget:
        return n * k, d * k
    cost_u = value_bits + index_bits(n * k)
    cost_v = value_bits + index_bits(d * k)
    scores = torch.cat([score_u.reshape(-1), score_v.reshape(-1)]).float()
    scores[int(score_u.reshape(-1).argmax())] = float("inf")
    scores[n * k + int(score_v.reshape(-1).argmax())] = float("inf")
    from_u = torch.cat([torch.ones(n * k, dtype=torch.bool), torch.zeros(d * k, dtype=torch.bool)])
    order = torch.argsort(scores, descending=True, stable=True)
    costs = torch.where(from_u[order], cost_u, cost_v).to(torch.int64)
    taken = int(torch.searchsorted(torch.cumsum(costs, 0), budget, right=True))
    s_u = int(from_u[order[:taken]].sum())
    s_v = taken - s_u
    _require_entries(s_u, s_v, n, d, k, budget)
    return s_u, s_v


def sparse_count(n: int, d: int, budget: int, value_bits: int = VALUE_BITS) -> int:
    """How many entries of an n×d matrix (values plus flat indices) fit in ``budget`` bits."""
    if value_bits * n * d <= budget:
        return n * d
    kept = min(budget // (value_bits + index_bits(n * d)), n * d - 1)
    if kept < 1:
        raise BudgetError(
            f"a budget of {budget} bits cannot hold one entry of a {n}x{d} matrix "
            f"({value_bits + index_bits(n * d)} bits each)"
        )
    return kept


def _require_entries(s_u: int, s_v: int, n: int, d: int, k: int, budget: int) -> None:
    if s_u < 1 or s_v < 1:
        raise BudgetError(
            f"a budget of {budget} bits cannot hold one entry of each factor of a rank-{k} "
            f"factorisation of a {n}x{d} matrix (got s_u={s_u}, s_v={s_v}); lower extra_rank"
        )
