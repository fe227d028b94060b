"""Bit accounting: the one place that says what a layer's encoding costs.

Every method is charged by these functions, so methods compete under identical rules. The cost
model is the paper's (arXiv 2511.02681, as read in docs/method.md): each kept entry of a
sparse factor costs a 32-bit value plus one flat position index of ``ceil(log2(positions))`` bits.
A factor kept whole needs no positions, which is why a dense rank-r truncated SVD costs exactly
``32·r·(n+d)`` bits: that is the per-layer budget ``B``.

Beyond the paper, an ``Encoding`` may store values narrower (16-bit floats, or 8-bit integers
with one 32-bit scale per column) and positions as a bitmap of the factor (one bit per slot)
instead of indices. These are charged by the same rules against the same fp32-defined budget, so
an encoding earns its place only by fitting more of the delta into the same bits. The stored
bytes follow these bits closely (bitmaps are packed; indices are 16- or 32-bit integers, see
``osd_core.layer``); both are shown to users.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BudgetError, ConfigError

VALUE_BITS = 32
POSITION_ENCODINGS = ("index", "bitmap")


@dataclass(frozen=True)
class Encoding:
    """How kept entries of one matrix are stored, as far as the bit count is concerned.

    ``scale_bits`` is charged once per column of the encoded matrix (8-bit values carry a 32-bit
    scale per column, that is per singular vector of a factor).
    """

    value_bits: int = VALUE_BITS
    positions: str = "index"
    scale_bits: int = 0

    def __post_init__(self) -> None:
        if self.positions not in POSITION_ENCODINGS:
            raise ConfigError(f"positions must be one of {', '.join(POSITION_ENCODINGS)}; got {self.positions!r}")
        if self.value_bits < 1 or self.scale_bits < 0:
            raise ConfigError(f"value_bits must be >= 1 and scale_bits >= 0, got {self.value_bits}, {self.scale_bits}")

    def entry_bits(self, rows: int, cols: int) -> int:
        """Bits of one more kept entry of a ``rows × cols`` matrix that is not kept whole."""
        return self.value_bits + (index_bits(rows * cols) if self.positions == "index" else 0)

    def fixed_bits(self, rows: int, cols: int) -> int:
        """Bits a sparse ``rows × cols`` matrix costs before its first entry: bitmap and scales."""
        return (rows * cols if self.positions == "bitmap" else 0) + self.scale_bits * cols


PAPER = Encoding()


def index_bits(positions: int) -> int:
    """Bits of one flat index into ``positions`` slots: ``ceil(log2(positions))``."""
    if positions < 1:
        raise ConfigError(f"a tensor must have at least one position, got {positions}")
    return math.ceil(math.log2(positions))


def factor_bits(rows: int, k: int, kept: int, encoding: Encoding = PAPER) -> int:
    """Bits of an ``rows × k`` factor with ``kept`` entries kept (paper accounting by default)."""
    total = rows * k
    if not 0 <= kept <= total:
        raise ConfigError(f"kept entries must lie in [0, {total}], got {kept}")
    if kept == total:
        return encoding.value_bits * kept + encoding.scale_bits * k
    return encoding.fixed_bits(rows, k) + encoding.entry_bits(rows, k) * kept


def factored_bits(n: int, d: int, k: int, s_u: int, s_v: int, encoding: Encoding = PAPER) -> int:
    """Bits of ``U`` (n×k, ``s_u`` kept) and ``V`` (d×k, ``s_v`` kept): the paper's ``mu``."""
    return factor_bits(n, k, s_u, encoding) + factor_bits(d, k, s_v, encoding)


def sparse_bits(n: int, d: int, kept: int, encoding: Encoding = PAPER) -> int:
    """Bits of ``kept`` entries of an n×d matrix stored as values plus positions."""
    return factor_bits(n, d, kept, encoding)


def layer_budget(n: int, d: int, rank: float) -> int:
    """The budget ``B = 32·r·(n+d)``: what a dense fp32 rank-``rank`` factorisation costs (rounded
    down to whole bits for a fractional rank)."""
    if not rank > 0:
        raise ConfigError(f"rank must be > 0, got {rank}")
    return math.floor(VALUE_BITS * rank * (n + d))


def equal_density_counts(n: int, d: int, k: int, budget: int, encoding: Encoding = PAPER) -> tuple[int, int]:
    """The largest equal-density counts ``(s_u, s_v)`` of a rank-``k`` factorisation within ``budget``.

    Both factors keep the same fraction of their entries, except that each keeps at least one.
    When the whole factorisation fits the budget densely it is kept whole (so rank ``k = r``
    reproduces the truncated SVD exactly).
    """
    if factored_bits(n, d, k, n * k, d * k, encoding) <= budget:
        return n * k, d * k
    free = budget - encoding.fixed_bits(n, k) - encoding.fixed_bits(d, k)
    per_density = n * k * encoding.entry_bits(n, k) + d * k * encoding.entry_bits(d, k)
    density = min(max(free, 0) / per_density, 1.0)
    s_u, s_v = min(math.floor(density * n * k), n * k - 1), min(math.floor(density * d * k), d * k - 1)
    # Each factor keeps at least its best entry: an empty factor zeroes the product, and the short
    # factor of a small matrix (a 2-row table at a fractional budget) would round down to nothing.
    s_u, s_v = max(s_u, 1), max(s_v, 1)
    while factored_bits(n, d, k, s_u, s_v, encoding) > budget and (s_u > 1 or s_v > 1):
        if s_v == 1 or (s_u > 1 and s_u * d >= s_v * n):
            s_u -= 1
        else:
            s_v -= 1
    if factored_bits(n, d, k, s_u, s_v, encoding) > budget:
        raise BudgetError(
            f"a budget of {budget} bits cannot hold one entry of each factor of a rank-{k} factorisation "
            f"of a {n}x{d} matrix ({factored_bits(n, d, k, 1, 1, encoding)} bits); raise the rank or lower extra_rank"
        )
    return s_u, s_v


def sparse_count(n: int, d: int, budget: int, encoding: Encoding = PAPER) -> int:
    """How many entries of an n×d matrix (values plus positions) fit in ``budget`` bits."""
    if factor_bits(n, d, n * d, encoding) <= budget:
        return n * d
    free = budget - encoding.fixed_bits(n, d)
    kept = min(max(free, 0) // encoding.entry_bits(n, d), n * d - 1)
    if kept < 1:
        raise BudgetError(
            f"a budget of {budget} bits cannot hold one entry of a {n}x{d} matrix "
            f"({encoding.entry_bits(n, d)} bits each after {encoding.fixed_bits(n, d)} fixed)"
        )
    return kept


def require_entries(s_u: int, s_v: int, n: int, d: int, k: int, budget: int) -> None:
    if s_u < 1 or s_v < 1:
        raise BudgetError(
            f"a budget of {budget} bits cannot hold one entry of each factor of a rank-{k} "
            f"factorisation of a {n}x{d} matrix (got s_u={s_u}, s_v={s_v}); lower extra_rank"
        )
