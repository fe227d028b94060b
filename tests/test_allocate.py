"""The per-model bit allocator: candidate budgets, measured error curves, and the greedy spend."""

import random

import pytest
import torch

from osd_core.allocate import (
    MULTIPLIERS,
    Option,
    allocate,
    best_within,
    candidate_budgets,
    layer_config,
    measure_curve,
    measure_whole,
)
from osd_core.budget import layer_budget
from osd_core.config import CompressionConfig
from osd_core.errors import BudgetError, ConfigError
from osd_core.whole import whole_layer, whole_options


def curve(*points):
    return [Option(bits, cost) for bits, cost in points]


def test_bits_go_to_the_layer_whose_error_falls_fastest():
    curves = {
        "steep": curve((10, 100.0), (20, 10.0), (40, 1.0)),
        "flat": curve((10, 100.0), (20, 99.0), (40, 98.0)),
    }
    result = allocate(curves, 60)
    assert result.budgets == {"flat": 20, "steep": 40}
    assert result.bits == 60 and result.cost == pytest.approx(100.0)


def test_a_zero_delta_gets_no_bits_and_its_share_goes_elsewhere():
    curves = {"zero": curve((0, 0.0)), "busy": curve((10, 50.0), (20, 20.0), (40, 5.0))}
    assert allocate(curves, 40).budgets == {"busy": 40, "zero": 0}


def test_the_total_is_never_exceeded_on_random_curves():
    rng = random.Random(0)
    for _ in range(200):
        curves = {}
        for layer in range(rng.randint(1, 8)):
            bits = sorted(rng.sample(range(1, 200), rng.randint(1, 5)))
            cost = sorted((rng.uniform(0, 100) for _ in bits), reverse=True)
            curves[f"l{layer}"] = curve(*zip(bits, cost, strict=True))
        cheapest = sum(min(o.bits for o in c) for c in curves.values())
        total = cheapest + rng.randint(0, 300)
        result = allocate(curves, total)
        assert result.bits <= total
        assert result.bits == sum(result.budgets.values())
        chosen = {name: {o.bits for o in c} for name, c in curves.items()}
        assert all(result.budgets[name] in chosen[name] for name in curves)


def test_more_total_bits_never_cost_more_damage_on_convex_curves():
    curves = {f"l{i}": curve(*[(b, 100.0 / (b * (i + 1))) for b in (1, 2, 4, 8)]) for i in range(4)}
    costs = [allocate(curves, total).cost for total in range(4, 33)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(costs, costs[1:], strict=False))


def test_never_worse_than_the_baseline_where_greedy_is_trapped():
    # Greedy buys b's cheap upgrade first and can no longer afford a's big one; uniform (a=10, b=1) is better.
    curves = {"a": curve((1, 10.0), (2, 9.9), (10, 0.0)), "b": curve((1, 10.0), (5, 2.0))}
    assert allocate(curves, 11).cost == pytest.approx(11.9)
    result = allocate(curves, 11, baseline={"a": 10, "b": 1})
    assert result.budgets == {"a": 10, "b": 1} and result.cost == pytest.approx(10.0)


def test_best_within_takes_the_least_damage_inside_each_limit():
    curves = {"a": curve((1, 5.0), (2, 3.0), (4, 1.0)), "b": curve((3, 2.0))}
    result = best_within(curves, {"a": 3, "b": 1})
    assert result.budgets == {"a": 2, "b": 3}  # b has nothing within its limit: its cheapest
    assert result.cost == pytest.approx(5.0)


def test_cheapest_options_above_the_total_are_refused():
    with pytest.raises(BudgetError, match="need 20 bits, more than the total 15"):
        allocate({"a": curve((10, 1.0)), "b": curve((10, 1.0))}, 15)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"a": []}, "layer 'a' has no budget options"),
        ({"a": curve((-1, 1.0))}, "bits >= 0"),
        ({"a": curve((1, float("nan")))}, "finite cost"),
        ({"a": curve((1, -2.0))}, "finite cost >= 0"),
    ],
)
def test_bad_curves_are_refused_naming_the_layer(bad, message):
    with pytest.raises(ConfigError, match=message):
        allocate(bad, 100)


def test_candidates_of_truncsvd_are_whole_ranks_at_their_exact_cost():
    budgets = candidate_budgets(CompressionConfig(method="truncsvd", rank=2), (64, 32))
    assert budgets == tuple(layer_budget(64, 32, r) for r in (1, 2, 3, 4, 6, 8))


def test_candidates_with_a_fixed_extra_rank_stop_at_the_dense_rank_k_cost():
    uniform = layer_budget(64, 32, 1)
    budgets = candidate_budgets(CompressionConfig(method="osd", rank=1, extra_rank=2), (64, 32))
    assert uniform in budgets and max(budgets) == 32 * 3 * (64 + 32)
    assert budgets == tuple(sorted({min(round(m * uniform), 32 * 3 * 96) for m in MULTIPLIERS}))
    assert max(candidate_budgets(CompressionConfig(method="sparse", rank=1), (4, 4))) == 32 * 16


def test_with_the_default_extra_rank_a_layer_given_more_bits_factors_at_a_higher_rank():
    config = CompressionConfig(method="magtruncsvd", rank=0.5)  # int4: k = 8r
    budgets = candidate_budgets(config, (64, 32))
    ranks = [layer_config(config, (64, 32), b).k for b in budgets]
    assert budgets[0] == round(0.25 * layer_budget(64, 32, 0.5)) and layer_budget(64, 32, 0.5) in budgets
    assert ranks == sorted(ranks) and ranks[0] == 1 and ranks[-1] == 16
    assert layer_config(config, (64, 32), layer_budget(64, 32, 0.5)).k == config.k == 4
    # no candidate asks for more singular vectors than the matrix has
    assert max(layer_config(config, (8, 6), b).k for b in candidate_budgets(config, (8, 6))) <= 6


def test_layer_config_leaves_fixed_ranks_and_dropped_layers_alone():
    fixed = CompressionConfig(method="osd", rank=1, extra_rank=2)
    assert layer_config(fixed, (64, 32), 10_000) is fixed
    assert layer_config(CompressionConfig(), (64, 32), 0) == CompressionConfig()
    assert layer_config(CompressionConfig(method="truncsvd"), (64, 32), layer_budget(64, 32, 3)).rank == 3


def test_measured_curves_start_at_dropping_the_layer_and_fall_with_bits():
    torch.manual_seed(0)
    delta = torch.randn(48, 6) @ torch.randn(6, 40)
    options = measure_curve("w", delta, CompressionConfig(method="magtruncsvd", rank=0.5, value_dtype="int8"))
    assert options[0] == Option(0, pytest.approx(float(delta.pow(2).sum())))
    costs = [o.cost for o in options]
    assert costs[-1] < 0.01 * costs[0] and costs[1] < costs[0]
    assert measure_curve("z", torch.zeros(8, 8), CompressionConfig()) == (Option(0, 0.0),)


def test_the_measuring_pass_slices_one_svd_and_measures_what_fresh_factorisations_would():
    """With the exact SVD, slicing the largest candidate's factors is exactly a fresh rank-k SVD."""
    from osd_core.factorize import compress_matrix
    from osd_core.svd import truncated_svd

    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(48, 6, generator=gen) @ torch.randn(6, 40, generator=gen) + 0.05 * torch.randn(48, 40,
                                                                                                       generator=gen)
    config = CompressionConfig(rank=0.5, svd="exact")
    sliced = measure_curve("w", delta, config)
    fresh = [Option(0, float(torch.linalg.vector_norm(delta)) ** 2)]
    for budget in candidate_budgets(config, (48, 40)):
        approx = compress_matrix("w", delta, layer_config(config, (48, 40), budget), budget_bits=budget)
        fresh.append(Option(budget, float(torch.linalg.vector_norm(delta - approx.delta())) ** 2))
    assert [o.bits for o in sliced] == [o.bits for o in fresh]
    assert [o.cost for o in sliced] == pytest.approx([o.cost for o in fresh], rel=1e-4)
    small = truncated_svd(delta, 2)
    with pytest.raises(ConfigError, match="precomputed factors of rank 2 do not fit a rank-8"):
        compress_matrix("w", delta, CompressionConfig(rank=1), factors=small)


def test_a_1d_delta_may_be_dropped_or_kept_whole_at_each_width_up_to_dense_dtype():
    assert whole_options(100, CompressionConfig()) == {0: None, 432: "int4"}  # int4 values and one float32 scale
    assert whole_options(100, CompressionConfig(dense_dtype="int8")) == {0: None, 432: "int4", 832: "int8"}
    assert whole_options(100, CompressionConfig(dense_dtype="float16")) == {0: None, 432: "int4", 832: "int8",
                                                                          1600: "float16"}


def test_whole_options_cost_what_is_stored_and_damage_falls_with_width():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(384, generator=gen) * 1e-3
    config = CompressionConfig(dense_dtype="float16")
    options = measure_whole("b", delta, config)
    assert [o.bits for o in options] == sorted(whole_options(384, config))
    assert options[0].cost == pytest.approx(float(delta.double().pow(2).sum()))
    costs = [o.cost for o in options]
    assert costs == sorted(costs, reverse=True) and costs[-1] < 1e-6 * costs[0]
    for option in options[1:]:
        layer = whole_layer("b", delta, config, option.bits)
        assert layer.paper_bits == layer.budget_bits == option.bits
        assert float((delta - layer.delta().reshape(-1)).pow(2).sum()) == pytest.approx(option.cost, rel=1e-6)
    dropped = whole_layer("b", delta, config, 0)
    assert (dropped.kind, dropped.budget_bits) == ("zero", 0)
    assert measure_whole("z", torch.zeros(8), config) == (Option(0, 0.0),)


def test_a_whole_budget_that_is_no_option_is_refused_naming_the_tensor():
    with pytest.raises(ConfigError, match=r"ln\.bias: 999 bits is none of its whole-tensor options: 0 \(dropped\), 432"):
        whole_layer("ln.bias", torch.ones(100), CompressionConfig(), 999)
