"""The bit accounting every method is charged by."""

import math

import pytest
import torch

from osd_core.budget import (
    Encoding,
    equal_density_counts,
    factor_bits,
    factored_bits,
    index_bits,
    layer_budget,
    sparse_bits,
    sparse_count,
)
from osd_core.errors import BudgetError, ConfigError
from osd_core.factorize import joint_counts


def test_dense_factors_cost_exactly_the_budget():
    assert factored_bits(384, 1536, 2, 384 * 2, 1536 * 2) == layer_budget(384, 1536, 2) == 32 * 2 * (384 + 1536)


def test_sparse_factor_entries_cost_a_value_and_a_flat_index():
    assert factor_bits(1024, 3, 10) == (32 + math.ceil(math.log2(3072))) * 10
    assert index_bits(1) == 0 and index_bits(2) == 1 and index_bits(1025) == 11


SHAPES = [(384, 384), (1536, 384), (384, 1536), (1024, 1024), (2, 384), (7, 13), (30522, 384)]
RANKS = [(1, 0), (1, 1), (1, 2), (2, 4), (1, 8)]


@pytest.mark.parametrize("n,d,r,c", [(n, d, r, c) for n, d in SHAPES for r, c in RANKS if r + c <= min(n, d)])
def test_equal_density_counts_never_exceed_the_budget(n, d, r, c):
    k = r + c
    budget = layer_budget(n, d, r)
    s_u, s_v = equal_density_counts(n, d, k, budget)
    assert factored_bits(n, d, k, s_u, s_v) <= budget
    if c == 0:
        assert (s_u, s_v) == (n * k, d * k)
    else:  # nearly all of the budget is spent: one more entry of either factor would not fit
        assert factored_bits(n, d, k, s_u + 1, s_v + 1) > budget
        assert abs(s_u / (n * k) - s_v / (d * k)) < 0.01 + 1 / min(n * k, d * k)


def test_worked_densities_match_the_notes():
    # docs/method.md: 1024x1024, r = 1 → about 37% at c=1, 24% at c=2, 14% at c=4, 8% at c=8
    densities = [equal_density_counts(1024, 1024, 1 + c, layer_budget(1024, 1024, 1))[0] / (1024 * (1 + c))
                 for c in (1, 2, 4, 8)]
    assert [round(x, 2) for x in densities] == [0.37, 0.24, 0.14, 0.08]


def test_budget_too_small_for_one_entry_is_refused():
    with pytest.raises(BudgetError, match="cannot hold one entry"):
        equal_density_counts(4, 4, 4, 40)
    with pytest.raises(BudgetError, match="cannot hold one entry"):
        sparse_count(1000, 1000, 40)


def test_sparse_count_fits_and_is_maximal():
    budget = layer_budget(384, 1536, 1)
    kept = sparse_count(384, 1536, budget)
    assert sparse_bits(384, 1536, kept) <= budget < sparse_bits(384, 1536, kept + 1)


def test_joint_counts_fit_and_follow_scores():
    gen = torch.Generator().manual_seed(0)
    score_u, score_v = torch.rand(100, 3, generator=gen), torch.rand(50, 3, generator=gen) * 0.01
    budget = layer_budget(100, 50, 1)
    s_u, s_v = joint_counts(score_u, score_v, budget)
    assert factored_bits(100, 50, 3, s_u, s_v) <= budget
    assert s_u > 5 * s_v >= 1  # U's scores dominate, so U gets the bits


def test_invalid_rank_and_counts_are_refused():
    with pytest.raises(ConfigError, match="rank must be > 0"):
        layer_budget(4, 4, 0)
    with pytest.raises(ConfigError, match="kept entries"):
        factor_bits(4, 2, 9)


ENCODINGS = [Encoding(32, "bitmap"), Encoding(16, "bitmap"), Encoding(8, "bitmap", 32), Encoding(8, "index", 32)]


def test_bitmap_and_scale_costs():
    # a bitmap costs one bit per slot whatever is kept; int8 values add a 32-bit scale per column
    assert factor_bits(1024, 3, 10, Encoding(16, "bitmap")) == 3072 + 16 * 10
    assert factor_bits(1024, 3, 10, Encoding(8, "bitmap", 32)) == 3072 + 3 * 32 + 8 * 10
    assert factor_bits(1024, 3, 3072, Encoding(8, "bitmap", 32)) == 3 * 32 + 8 * 3072  # whole: no positions
    assert factor_bits(1024, 3, 10, Encoding(8, "index", 32)) == 3 * 32 + (8 + 12) * 10


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: f"{e.value_bits}-{e.positions}")
@pytest.mark.parametrize("n,d,r,c", [(384, 1536, 1, 2), (1536, 384, 1, 5), (1024, 1024, 2, 4), (7, 13, 1, 1)])
def test_equal_density_counts_fit_and_spend_the_budget_under_every_encoding(encoding, n, d, r, c):
    k, budget = r + c, layer_budget(n, d, r)
    if factored_bits(n, d, k, n * k, d * k, encoding) <= budget:
        assert equal_density_counts(n, d, k, budget, encoding) == (n * k, d * k)
        return
    s_u, s_v = equal_density_counts(n, d, k, budget, encoding)
    assert factored_bits(n, d, k, s_u, s_v, encoding) <= budget
    assert factored_bits(n, d, k, min(s_u + 1, n * k - 1), min(s_v + 1, d * k - 1), encoding) > budget or (
        s_u == n * k - 1 and s_v == d * k - 1)


def test_joint_counts_charge_the_bitmap_once():
    gen = torch.Generator().manual_seed(0)
    score_u, score_v = torch.rand(100, 3, generator=gen), torch.rand(50, 3, generator=gen)
    budget = layer_budget(100, 50, 1)
    encoding = Encoding(16, "bitmap")
    s_u, s_v = joint_counts(score_u, score_v, budget, encoding)
    assert factored_bits(100, 50, 3, s_u, s_v, encoding) <= budget < factored_bits(100, 50, 3, s_u + 1, s_v, encoding)


def test_bad_encodings_are_refused():
    with pytest.raises(ConfigError, match="positions must be one of index, bitmap"):
        Encoding(8, "bits")
    with pytest.raises(ConfigError, match="value_bits must be >= 1"):
        Encoding(0)


def test_a_short_factor_keeps_its_best_entry_at_a_fractional_budget():
    # The 2x384 token-type table at a quarter of a rank-1 budget, paper encoding: equal density
    # would round U's two slots down to none, which zeroes the product; it keeps one instead.
    budget = layer_budget(2, 384, 0.25)
    s_u, s_v = equal_density_counts(2, 384, 1, budget)
    assert s_u == 1 and s_v > 1 and factored_bits(2, 384, 1, s_u, s_v) <= budget
    assert factored_bits(2, 384, 1, s_u, s_v + 1) > budget  # and V spends the rest
