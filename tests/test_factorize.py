"""Every method under one budget: counts, budgets, limits and edge cases of the math."""

from dataclasses import replace

import pytest
import torch

from osd_core.budget import Encoding, factored_bits, layer_budget, sparse_bits
from osd_core.config import SCALED_DTYPES, CompressionConfig
from osd_core.errors import ArtifactError, BudgetError, CheckpointError, ConfigError
from osd_core.factorize import _top, compress_matrix, proportional_counts, taylor_scores
from osd_core.layer import CompressedLayer, pack_levels, unpack_bitmap, unpack_levels

METHODS = ["truncsvd", "magtruncsvd", "osd", "sparse"]


def structured_delta(n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.diag(torch.tensor([8.0, 4, 2, 1, 0.5, 0.25]))
    low = torch.randn(n, 6, generator=gen) @ spectrum @ torch.randn(6, d, generator=gen)
    return (low + 0.05 * torch.randn(n, d, generator=gen)) * 1e-3


def gradient(n, d, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def rel_error(delta, layer):
    return float(torch.linalg.norm(delta - layer.delta()) / torch.linalg.norm(delta))


PAPER = {"value_dtype": "float32", "positions": "index"}  # the paper's encoding; the default is packed


def layer_encoding(layer, config):
    """The encoding ``layer`` was charged under: the config's, with the positions it chose."""
    prefix = "u." if layer.kind == "factored" else ""
    positions = "bitmap" if f"{prefix}bitmap" in layer.tensors else "index"
    return Encoding(config.value_bits, positions, 32 if config.stored_dtype in SCALED_DTYPES else 0)


def kept_entries(layer, prefix):
    """How many entries a part keeps: int4 values pack two to a byte, so not their numel."""
    numel = (layer.shape[0 if prefix == "u." else 1] * layer.k) if prefix else layer.shape[0] * layer.shape[1]
    if f"{prefix}bitmap" in layer.tensors:
        return int(unpack_bitmap(layer.tensors[f"{prefix}bitmap"], numel).sum())
    return layer.tensors[f"{prefix}index"].numel() or numel


@pytest.mark.parametrize("encoding", [PAPER, {}], ids=["paper", "default"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,d", [(64, 64), (96, 40), (40, 96), (384, 1536)])
@pytest.mark.parametrize("r,c", [(1, 1), (1, 4), (2, 2)])
def test_budget_is_never_exceeded_and_counts_are_exact(method, n, d, r, c, encoding):
    delta = structured_delta(n, d)
    config = CompressionConfig(method=method, rank=r, extra_rank=c, **encoding)
    layer = compress_matrix("w", delta, config, gradient(n, d))
    budget, charged = layer_budget(n, d, r), layer_encoding(layer, config)
    assert layer.budget_bits == budget and layer.paper_bits <= budget
    if layer.kind == "factored":
        k = r if method == "truncsvd" else r + c
        s_u, s_v = kept_entries(layer, "u."), kept_entries(layer, "v.")
        assert layer.k == k and layer.paper_bits == factored_bits(n, d, k, s_u, s_v, charged)
        u, v = layer.factors()
        assert int((u != 0).sum()) <= s_u and int((v != 0).sum()) <= s_v
        whole = (s_u, s_v) == (n * k, d * k)
        assert whole or layer.paper_bits > budget - 2 * (32 + 32)  # spends the budget, less one entry per factor
    else:
        assert layer.paper_bits == sparse_bits(n, d, kept_entries(layer, ""), charged)


def test_osd_at_c_zero_is_truncated_svd():
    delta, grad = structured_delta(80, 50), gradient(80, 50)
    osd = compress_matrix("w", delta, CompressionConfig(method="osd", rank=3, extra_rank=0, **PAPER), grad)
    svd = compress_matrix("w", delta, CompressionConfig(method="truncsvd", rank=3))
    assert torch.equal(osd.delta(), svd.delta())
    assert osd.paper_bits == svd.paper_bits == layer_budget(80, 50, 3)


@pytest.mark.parametrize("method", METHODS)
def test_error_falls_as_the_budget_grows(method):
    delta, grad = structured_delta(120, 90), gradient(120, 90)
    errors = [rel_error(delta, compress_matrix("w", delta, CompressionConfig(method=method, rank=r, extra_rank=2),
                                               grad))
              for r in (1, 2, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_full_rank_truncated_svd_reproduces_the_delta():
    delta = structured_delta(60, 40)
    layer = compress_matrix("w", delta, CompressionConfig(method="truncsvd", rank=40, svd="exact"))
    assert torch.allclose(layer.delta(), delta, atol=1e-8, rtol=1e-4)


def test_taylor_scores_do_not_depend_on_sigma_placement():
    delta, grad = structured_delta(70, 50), gradient(70, 50)
    results = [compress_matrix("w", delta, CompressionConfig(method="osd", rank=1, extra_rank=3, sigma=s, **PAPER),
                               grad)
               for s in ("sqrt", "u", "v")]
    for other in results[1:]:
        assert torch.equal(other.tensors["u.index"], results[0].tensors["u.index"])
        assert torch.equal(other.tensors["v.index"], results[0].tensors["v.index"])
        assert torch.allclose(other.delta(), results[0].delta(), atol=1e-9, rtol=1e-4)


def test_taylor_score_is_first_order_loss_change():
    gen = torch.Generator().manual_seed(3)
    u, v, g = torch.randn(5, 2, generator=gen), torch.randn(4, 2, generator=gen), torch.randn(5, 4, generator=gen)
    score_u, _ = taylor_scores(u, v, g)
    loss = lambda uu: float((g * (uu @ v.T)).sum())  # linear loss: first order is exact
    zeroed = u.clone()
    zeroed[2, 1] = 0
    assert score_u[2, 1] == pytest.approx(abs(loss(u) - loss(zeroed)), rel=1e-5)


def test_joint_allocation_stays_within_budget_and_differs_from_equal():
    delta, grad = structured_delta(200, 50), gradient(200, 50)
    config = CompressionConfig(method="osd", rank=1, extra_rank=11, factor_split="joint")  # k = 12 > int4's 8r
    joint = compress_matrix("w", delta, config, grad)
    equal = compress_matrix("w", delta, replace(config, factor_split="equal"), grad)
    assert joint.paper_bits <= layer_budget(200, 50, 1)
    assert kept_entries(joint, "u.") != kept_entries(equal, "u.")


def test_all_zero_delta_compresses_to_nothing():
    layer = compress_matrix("emb", torch.zeros(300, 40), CompressionConfig(method="osd"), torch.zeros(300, 40))
    assert layer.kind == "zero" and layer.nbytes == 0 and layer.paper_bits == 0
    assert torch.equal(layer.delta(), torch.zeros(300, 40))


@pytest.mark.parametrize("method", METHODS)
def test_row_sparse_delta_works(method):
    delta = torch.zeros(500, 32)
    delta[::9] = structured_delta(56, 32)  # like a word-embedding delta: most rows untouched
    grad = torch.zeros(500, 32)
    grad[::9] = gradient(56, 32)
    layer = compress_matrix("emb", delta, CompressionConfig(method=method, rank=2, extra_rank=2), grad)
    rebuilt = layer.delta()
    assert torch.isfinite(rebuilt).all() and rel_error(delta, layer) < 1.0


def test_rank_beyond_the_matrix_is_refused(reliability):
    with pytest.raises(ConfigError, match="exceeds min") as err:
        compress_matrix("q", torch.ones(4, 10), CompressionConfig(method="magtruncsvd", rank=2, extra_rank=3))
    reliability.refused("rank beyond one layer's matrix (library call)", str(err.value))


@pytest.mark.parametrize("method", ["magtruncsvd", "sparse"])
def test_budget_too_small_for_one_entry_is_refused(reliability, method):
    # The uniform budget 32·r·(n+d) always holds an entry; an allocator's explicit budget may not.
    with pytest.raises(BudgetError, match="cannot hold one entry") as err:
        compress_matrix("q", structured_delta(30, 20), CompressionConfig(method=method, extra_rank=1), budget_bits=40)
    reliability.refused(f"budget too small for one entry ({method}, 40 bits; library call)", str(err.value))


def test_osd_without_gradient_is_refused():
    with pytest.raises(ConfigError, match="needs the layer's loss gradient"):
        compress_matrix("q", structured_delta(20, 20), CompressionConfig(method="osd"))


def test_non_finite_input_is_refused_with_the_tensor_name():
    delta = structured_delta(20, 20)
    delta[3, 4] = float("nan")
    with pytest.raises(CheckpointError, match="layer.0.query: delta contains 1 NaN"):
        compress_matrix("layer.0.query", delta, CompressionConfig(method="truncsvd"))


@pytest.mark.parametrize("field,value,message", [
    ("rank", 0, "rank must be a number > 0, got 0"),
    ("rank", -2, "rank must be a number > 0"),
    ("rank", float("nan"), "rank must be a number > 0"),
    ("rank", True, "rank must be a number > 0"),
    ("rank", "1", "rank must be a number > 0"),
    ("extra_rank", -1, "extra_rank must be"),
    ("method", "svd++", "method must be one of"),
    ("sigma", "left", "sigma must be one of"),
])
def test_invalid_config_is_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        CompressionConfig(**{field: value})


def test_truncsvd_refuses_a_fractional_rank_that_relaxed_methods_take():
    with pytest.raises(ConfigError, match="'truncsvd' keeps whole singular vectors: rank must be an integer, got 0.5"):
        CompressionConfig(method="truncsvd", rank=0.5)
    assert CompressionConfig(method="truncsvd", rank=2.0).rank == 2  # one spelling per budget
    half = CompressionConfig(method="magtruncsvd", rank=0.5)  # int4 values: k = 8r
    assert (half.k, half.c) == (4, 3.5)
    assert CompressionConfig(rank=0.5, value_dtype="float32").k == 1
    assert CompressionConfig(rank=1.5, extra_rank=1).k == 3


def test_a_fractional_rank_spends_its_fraction_of_the_budget():
    delta = structured_delta(60, 40)
    layer = compress_matrix("w", delta, CompressionConfig(method="magtruncsvd", rank=0.5))
    assert layer.budget_bits == layer_budget(60, 40, 0.5) == 16 * 100
    assert 0.9 * layer.budget_bits < layer.paper_bits <= layer.budget_bits


def test_a_zero_budget_drops_the_layer():
    layer = compress_matrix("w", structured_delta(30, 20), CompressionConfig(), budget_bits=0)
    assert layer.kind == "zero" and layer.budget_bits == 0 and not layer.delta().any()


def test_a_rank_too_small_to_buy_one_bit_is_refused_not_silently_dropped():
    with pytest.raises(BudgetError, match="q: rank 0.0001 gives its 30x20 delta a budget of 0 bits"):
        compress_matrix("q", structured_delta(30, 20), CompressionConfig(rank=1e-4))
    with pytest.raises(ConfigError, match="budget_bits must be >= 0, got -5"):
        compress_matrix("q", structured_delta(30, 20), CompressionConfig(), budget_bits=-5)


def test_fractional_extra_ranks_read_cleanly():
    assert CompressionConfig(rank=0.7, value_dtype="float16").c == 0.3  # not 0.30000000000000004
    int8 = [CompressionConfig(rank=r, value_dtype="int8").k for r in (0.125, 0.375, 0.625, 0.875)]
    assert int8 == [1, 2, 3, 4]  # halves round up


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["truncsvd", "magtruncsvd", "osd", "sparse"])
def test_gpu_compression_matches_cpu(method):
    delta, grad = structured_delta(512, 384), gradient(512, 384)
    config = CompressionConfig(method=method, rank=1, extra_rank=3, importance="damage", refit=2)
    on_cpu = compress_matrix("w", delta, config, grad)
    on_gpu = compress_matrix("w", delta, config, grad, device="cuda")
    assert on_gpu.tensors["u.values" if on_gpu.kind == "factored" else "values"].device.type == "cpu"
    assert on_gpu.paper_bits == on_cpu.paper_bits
    assert rel_error(delta, on_gpu) == pytest.approx(rel_error(delta, on_cpu), rel=1e-3)


def weighted_error(delta, approx, rows, cov):
    err = delta - approx
    return float((rows[:, None] * (err @ cov * err)).sum())


def spd(d, seed=5):
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed))
    return a @ a.T / d + 0.1 * torch.eye(d)


def test_damage_scores_do_not_depend_on_sigma_placement():
    delta, cov = structured_delta(60, 40), spd(40)
    config = dict(method="osd", importance="damage", extra_rank=3, **PAPER)
    layers = [compress_matrix("w", delta, CompressionConfig(sigma=s, **config),
                              input_cov=cov) for s in ("sqrt", "u", "v")]
    for other in layers[1:]:
        assert torch.equal(other.tensors["u.index"], layers[0].tensors["u.index"])
        assert torch.equal(other.tensors["v.index"], layers[0].tensors["v.index"])


def test_refit_never_increases_the_weighted_error():
    delta, cov, rows = structured_delta(80, 50), spd(50), torch.rand(80) + 0.5
    errors = []
    for rounds in (0, 1, 3):
        config = CompressionConfig(method="osd", importance="damage", extra_rank=3, refit=rounds, **PAPER)
        layer = compress_matrix("w", delta, config, row_weight=rows, input_cov=cov)
        from osd_core.factorize import OutputMetric

        metric = OutputMetric.build("w", (80, 50), rows, cov, "cpu")
        errors.append(weighted_error(delta, layer.delta(), metric.rows, metric.cov))
        unrefit = compress_matrix("w", delta, replace(config, refit=0), row_weight=rows, input_cov=cov)
        assert torch.equal(layer.tensors["u.index"], unrefit.tensors["u.index"])
    assert errors[1] <= errors[0] * (1 + 1e-5) and errors[2] <= errors[1] * (1 + 1e-5) and errors[2] < errors[0]


def test_whitening_gives_the_best_rank_k_fit_in_the_weighted_metric():
    from osd_core.factorize import OutputMetric

    delta, cov = structured_delta(70, 40), spd(40, seed=9)
    metric = OutputMetric.build("w", (70, 40), None, cov, "cpu")
    plain = compress_matrix("w", delta, CompressionConfig(method="truncsvd", rank=3, svd="exact"), input_cov=cov)
    white = compress_matrix("w", delta, CompressionConfig(method="truncsvd", rank=3, svd="exact", whiten=True),
                            input_cov=cov)
    assert weighted_error(delta, white.delta(), metric.rows, metric.cov) < weighted_error(
        delta, plain.delta(), metric.rows, metric.cov)


def test_bad_calibration_statistics_are_refused():
    with pytest.raises(CheckpointError, match="input covariance must be a finite 20x20 matrix"):
        compress_matrix("w", structured_delta(30, 20), CompressionConfig(method="osd", importance="damage"),
                        input_cov=torch.ones(19, 19))


@pytest.mark.parametrize("method", ["magtruncsvd", "sparse"])
def test_half_precision_values_buy_more_entries_under_the_same_budget(method):
    delta = structured_delta(384, 256)
    wide = compress_matrix("w", delta, CompressionConfig(method=method, extra_rank=3, **PAPER))
    narrow = compress_matrix("w", delta, CompressionConfig(method=method, extra_rank=3, value_dtype="float16",
                                                           positions="index"))
    part = "u.values" if method != "sparse" else "values"
    assert narrow.tensors[part].dtype == torch.float16
    assert narrow.paper_bits <= narrow.budget_bits == wide.budget_bits
    assert narrow.tensors[part].numel() > 1.4 * wide.tensors[part].numel()
    assert rel_error(delta, narrow) < rel_error(delta, wide)


@pytest.mark.parametrize("method", ["magtruncsvd", "sparse"])
def test_int8_values_with_bitmaps_fit_the_budget_in_real_bytes_and_lower_the_error(method):
    delta = structured_delta(384, 256)
    paper = compress_matrix("w", delta, CompressionConfig(method=method, extra_rank=2, **PAPER))
    packed = compress_matrix("w", delta, CompressionConfig(method=method, extra_rank=5, value_dtype="int8",
                                                            positions="auto"))
    prefix = "u." if method == "magtruncsvd" else ""
    assert packed.tensors[f"{prefix}values"].dtype == torch.int8 and f"{prefix}scale" in packed.tensors
    assert packed.paper_bits <= packed.budget_bits == paper.budget_bits
    if f"{prefix}bitmap" in packed.tensors:  # real bytes follow the bits: bitmaps are packed
        assert packed.nbytes <= packed.budget_bits / 8 + 16
    assert rel_error(delta, packed) < rel_error(delta, paper)


def test_int8_decoding_matches_the_quantised_masked_factors():
    from osd_core.factorize import split_sigma
    from osd_core.svd import truncated_svd

    delta = structured_delta(64, 48)
    config = CompressionConfig(method="magtruncsvd", extra_rank=3, value_dtype="int8", positions="bitmap")
    layer = compress_matrix("w", delta, config)
    u, _ = layer.factors()
    scale = layer.tensors["u.scale"]
    assert torch.allclose(u.abs().amax(0), scale * 127, rtol=1e-6)  # each column's peak maps to 127
    exact, _ = split_sigma(truncated_svd(delta, config.k, method=config.svd, power_iters=config.power_iters,
                                         seed=config.seed), config.sigma)
    kept = u != 0
    assert int(kept.sum()) > 0.5 * u.numel()
    assert bool(((u - exact).abs()[kept] <= (scale / 2 + 1e-7).expand_as(u)[kept]).all())  # rounding only


def test_auto_positions_pick_whichever_keeps_more():
    delta = structured_delta(384, 256)
    wide_values = {"value_dtype": "float32", "positions": "auto"}
    sparse_few = compress_matrix("w", delta, CompressionConfig(method="sparse", **wide_values))
    factored_many = compress_matrix("w", delta, CompressionConfig(method="magtruncsvd", extra_rank=2, **wide_values))
    assert "index" in sparse_few.tensors  # ~1% of the delta: indices are cheaper than a bitmap
    assert "u.bitmap" in factored_many.tensors  # ~24% of a factor: the bitmap is cheaper


def test_damaged_encodings_never_decode():
    layer = compress_matrix("w", structured_delta(64, 48), CompressionConfig(
        method="magtruncsvd", extra_rank=3, value_dtype="int8", positions="bitmap"))
    bitmap = layer.tensors["u.bitmap"].clone()
    bitmap[0] ^= 0xFF
    cases = {
        "bitmap marks": {**layer.tensors, "u.bitmap": bitmap},
        "needs exactly one of": {**layer.tensors, "u.index": torch.zeros(3, dtype=torch.int16)},
        "must accompany integer values": {k: t for k, t in layer.tensors.items() if k != "u.scale"},
        "scale must be float32": {**layer.tensors, "u.scale": layer.tensors["u.scale"][:-1]},
        "unexpected payload tensors": {**layer.tensors, "u.extra": torch.zeros(1)},
    }
    for message, tensors in cases.items():
        with pytest.raises(ArtifactError, match=message):
            CompressedLayer("w", "factored", layer.shape, tensors, k=layer.k).delta()


def test_default_extra_rank_is_what_dense_factors_of_the_value_width_fill():
    config = CompressionConfig(rank=2)
    assert (config.stored_dtype, config.c, config.k) == ("int4", 14, 16)
    assert replace(config, rank=4).c == 28  # follows the rank, not the value it was built with
    assert CompressionConfig(rank=2, value_dtype="int8").c == 6
    assert CompressionConfig(rank=3, value_dtype="float16").c == 3
    assert CompressionConfig(rank=3, value_dtype="float32").c == 1
    assert CompressionConfig(rank=3, extra_rank=5).c == 5
    truncsvd = CompressionConfig(method="truncsvd", rank=3)
    assert (truncsvd.c, truncsvd.k, truncsvd.stored_dtype, truncsvd.value_bits) == (0, 3, "float32", 32)


def test_dare_keeps_as_many_entries_as_sparse_at_random_and_rescaled():
    delta = structured_delta(60, 40)
    config = CompressionConfig(method="dare", rank=2, **PAPER)
    dare = compress_matrix("w", delta, config)
    sparse = compress_matrix("w", delta, replace(config, method="sparse"))
    kept = dare.tensors["values"].numel()
    assert dare.kind == "sparse" and kept == sparse.tensors["values"].numel() < delta.numel()
    assert dare.paper_bits == sparse.paper_bits <= layer_budget(60, 40, 2)
    assert not torch.equal(dare.tensors["index"], sparse.tensors["index"])  # not the largest entries
    positions = dare.tensors["index"].long()
    assert torch.allclose(dare.tensors["values"], delta.reshape(-1)[positions] * delta.numel() / kept)
    assert torch.equal(compress_matrix("w", delta, config).tensors["index"], dare.tensors["index"])  # seeded
    assert not torch.equal(compress_matrix("v", delta, config).tensors["index"], dare.tensors["index"])


def test_dare_is_unbiased_over_seeds():
    delta = structured_delta(30, 20)
    config = CompressionConfig(method="dare", rank=2, **PAPER)
    mean = sum(compress_matrix("w", delta, replace(config, seed=seed)).delta() for seed in range(400)) / 400
    assert rel_error(delta, compress_matrix("w", delta, config)) > 1.0  # one draw is far off in Frobenius norm
    assert float(torch.linalg.norm(mean - delta) / torch.linalg.norm(delta)) < 0.15  # the expectation is not


def test_impart_spreads_the_kept_entries_by_singular_value_at_random_and_rescaled():
    delta = structured_delta(120, 80)
    config = CompressionConfig(method="impart", rank=2, svd="exact", **PAPER)
    impart = compress_matrix("w", delta, config)
    magnitude = compress_matrix("w", delta, replace(config, method="magtruncsvd"))
    assert impart.kind == "factored" and impart.k == magnitude.k
    assert impart.paper_bits == magnitude.paper_bits <= layer_budget(120, 80, 2)  # the same count, the same bits
    assert not torch.equal(impart.tensors["u.index"], magnitude.tensors["u.index"])  # not the largest entries
    per_column = torch.bincount(impart.tensors["u.index"].long() % impart.k, minlength=impart.k)
    assert bool((per_column[:-1] >= per_column[1:]).all()) and per_column[0] > per_column[-1]  # σ descends
    assert torch.equal(compress_matrix("w", delta, config).tensors["v.index"], impart.tensors["v.index"])  # seeded
    assert not torch.equal(compress_matrix("x", delta, config).tensors["v.index"], impart.tensors["v.index"])


def test_impart_is_unbiased_over_seeds():
    delta = structured_delta(30, 20)
    config = CompressionConfig(method="impart", rank=2, svd="exact", **PAPER)
    rank_k = compress_matrix("w", delta, replace(config, method="truncsvd", rank=config.k)).delta()
    mean = sum(compress_matrix("w", delta, replace(config, seed=seed)).delta() for seed in range(400)) / 400
    one = compress_matrix("w", delta, config).delta()
    assert float(torch.linalg.norm(one - rank_k) / torch.linalg.norm(rank_k)) > 0.3  # one draw is far off
    assert float(torch.linalg.norm(mean - rank_k) / torch.linalg.norm(rank_k)) < 0.1  # its expectation is not


@pytest.mark.parametrize("weights, total, cap, expected", [
    ([4.0, 2.0, 1.0, 0.0], 10, 5, [5, 4, 1, 0]),  # the largest capped, the rest in proportion, nothing for 0
    ([4.0, 2.0, 1.0, 0.0], 100, 5, [5, 5, 5, 0]),  # more than fits: every positive column whole
    ([1.0, 1.0, 1.0], 4, 5, [2, 1, 1]),  # ties: the remainder to the first
    ([3.0, 1.0], 0, 9, [0, 0]),
])
def test_proportional_counts(weights, total, cap, expected):
    assert proportional_counts(torch.tensor(weights), total, cap).tolist() == expected


def test_bitdelta_stores_one_bit_per_entry_and_the_mean_magnitude():
    delta = structured_delta(600, 40)
    layer = compress_matrix("w", delta, CompressionConfig(method="bitdelta", rank=1))
    assert layer.kind == "sign" and layer.paper_bits == 600 * 40 + 32 and layer.nbytes == 600 * 40 // 8 + 4
    assert layer.budget_bits == layer_budget(600, 40, 1) < layer.paper_bits  # its cost does not follow r
    expected = torch.where(delta > 0, 1.0, -1.0) * delta.abs().mean()
    assert torch.allclose(layer.delta(), expected)
    with pytest.raises(ArtifactError, match="a sign layer of shape \\[600, 40\\] needs a uint8 'bitmap' of 3000"):
        CompressedLayer("w", "sign", (600, 40), {**layer.tensors, "bitmap": layer.tensors["bitmap"][:-1]})


@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_top_keeps_what_a_stable_descending_sort_keeps(values):
    """The selection must keep exactly the sort's positions: the stored masks, and so the bytes, depend on it."""
    g = torch.Generator().manual_seed(5)
    score = torch.rand(300, 7, generator=g) if values == "distinct" else \
        torch.randint(0, 4, (300, 7), generator=g).float()
    for count in (0, 1, 2, 50, 1049, 2099, 2100, 2500):
        expected = torch.argsort(score.reshape(-1), descending=True, stable=True)[:count].sort().values
        assert torch.equal(_top(score, count), expected), count


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 4, 7, 8, 9])
def test_narrow_values_pack_several_to_a_byte_and_come_back(count, bits):
    top = (1 << (bits - 1)) - 1
    q = torch.arange(count, dtype=torch.int8) % (2 * top + 1) - top
    packed = pack_levels(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count // (8 // bits))
    assert torch.equal(unpack_levels(packed, count, bits, "w", "U"), q)


def test_int4_packing_is_the_layout_of_earlier_versions():
    assert pack_levels(torch.tensor([1, -7, 7], dtype=torch.int8), 4).tolist() == [0x19, 0x0F]  # q + 8, low first
    assert pack_levels(torch.tensor([1, -1, 0, 1, 0], dtype=torch.int8), 2).tolist() == [0b11100111, 0b10]


def test_damaged_narrow_values_are_refused():
    packed = pack_levels(torch.tensor([1, -7, 7], dtype=torch.int8), 4)
    with pytest.raises(ArtifactError, match="must be 1 bytes for 2 entries"):
        unpack_levels(packed, 2, 4, "w", "U")
    with pytest.raises(ArtifactError, match="zero field or non-zero padding"):
        unpack_levels(torch.tensor([0x09, 0x0F], dtype=torch.uint8), 3, 4, "w", "U")  # 0x0F: its high nibble is 0
    with pytest.raises(ArtifactError, match="zero field or non-zero padding"):
        unpack_levels(torch.tensor([0x99, 0x19], dtype=torch.uint8), 3, 4, "w", "U")  # padding nibble 1
    with pytest.raises(ArtifactError, match="zero field or non-zero padding"):
        unpack_levels(torch.tensor([0b11100111, 0b0110], dtype=torch.uint8), 5, 2, "w", "U")  # padding field 01


@pytest.mark.parametrize("positions, gain", [("bitmap", 1.5), ("index", 1.15)])
def test_int4_factors_decode_on_their_grid_and_keep_more_entries_than_int8(positions, gain):
    delta = structured_delta(96, 64)
    config = CompressionConfig(method="magtruncsvd", rank=1, extra_rank=7, value_dtype="int4", positions=positions)
    layer = compress_matrix("w", delta, config)
    assert layer.tensors["u.values"].dtype == torch.uint8 and layer.budget_bits >= layer.paper_bits
    u, _ = layer.factors()
    step = layer.tensors["u.scale"]
    levels = u / torch.where(step > 0, step, 1.0)  # a column with nothing kept has scale 0
    assert bool((levels.abs() <= 7 + 1e-4).all()) and torch.allclose(levels, levels.round(), atol=1e-4)
    eight = compress_matrix("w", delta, replace(config, value_dtype="int8"))
    # 4 bits less per value: at least 1.5 times the entries with a bitmap, fewer with 13-bit indices
    assert kept_entries(layer, "u.") > gain * kept_entries(eight, "u.")
    assert layer.k == eight.k == 8
    damaged = {**layer.tensors, "u.values": layer.tensors["u.values"][:-1]}
    with pytest.raises(ArtifactError, match="int4 values must be"):
        CompressedLayer("w", "factored", layer.shape, damaged, k=layer.k).delta()


def spectrum_delta(n, d, seed=0):
    """A delta whose singular values fall off slowly, as fine-tunes' do: no rank holds it all."""
    gen = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(n, min(n, d), generator=gen))
    right, _ = torch.linalg.qr(torch.randn(d, min(n, d), generator=gen))
    sigma = 1.0 / torch.arange(1, min(n, d) + 1).float() ** 0.6
    return (left * sigma) @ right.T * 1e-3


@pytest.mark.parametrize("rank", [0.25, 1, 4])
def test_deltacome_spends_more_bits_on_larger_singular_values_within_the_budget(rank):
    delta = spectrum_delta(384, 256)
    layer = compress_matrix("w", delta, CompressionConfig(method="deltacome", rank=rank, svd="exact"))
    groups = [group for group in ("q8.", "q4.", "q2.") if f"{group}u.values" in layer.tensors]
    widths = {"q8.": 8, "q4.": 4, "q2.": 2}
    columns = {group: layer.tensors[f"{group}u.scale"].numel() for group in groups}
    assert layer.kind == "factored" and len(groups) >= 2 and sum(columns.values()) == layer.k
    assert layer.paper_bits == sum(((384 + 256) * widths[g] + 64) * columns[g] for g in groups) <= layer.budget_bits
    assert layer.budget_bits - layer.paper_bits < (384 + 256) * 2 + 64  # not even one more 2-bit vector fits
    stored = sum(t.numel() * t.element_size() for key, t in layer.tensors.items() if key.endswith("values"))
    assert stored == sum(-(-(384 + 256) * columns[g] * widths[g] // 8) for g in groups)
    # widest first, and the stored columns are the leading singular vectors in order: no narrow
    # vector was bought before a wider one of a larger singular value
    u, _ = layer.factors()
    exact = torch.linalg.svd(delta, full_matrices=False).U[:, : layer.k]
    match = (torch.nn.functional.normalize(u, dim=0).T @ exact).abs().argmax(dim=1)
    assert torch.equal(match, torch.arange(layer.k))


@pytest.mark.parametrize("rank", [0.25, 1, 4])
def test_deltacome_beats_truncated_svd_and_int4_magnitude_masks_lose_to_neither_by_much(rank):
    delta = spectrum_delta(384, 256)
    mixed = rel_error(delta, compress_matrix("w", delta, CompressionConfig(method="deltacome", rank=rank, svd="exact")))
    if float(rank).is_integer():
        plain = rel_error(delta, compress_matrix("w", delta, CompressionConfig(method="truncsvd", rank=int(rank),
                                                                                svd="exact")))
        assert mixed < 0.95 * plain  # narrower vectors buy more of the spectrum than fp32 ones
    int4 = compress_matrix("w", delta, CompressionConfig(method="magtruncsvd", rank=rank, svd="exact"))
    assert 0.8 < rel_error(delta, int4) / mixed < 1.25


def test_damaged_width_groups_never_decode():
    delta = spectrum_delta(96, 64)
    layer = compress_matrix("w", delta, CompressionConfig(method="deltacome", rank=2, svd="exact"))
    assert "q2.u.values" in layer.tensors
    cases = {
        "a group kept sparse": ({"q2.u.index": torch.tensor([0], dtype=torch.int16)}, "kept whole"),
        "int4 values in the int2 group": ({"q2.u.values": layer.tensors["q4.u.values"]}, "int2 values|kept whole"),
        "short scales": ({"q2.v.scale": layer.tensors["q2.v.scale"][:-1]}, "equal non-empty"),
        "a plain pair beside the groups": ({"u.values": layer.tensors["q2.u.values"]}, "unexpected payload"),
    }
    for what, (change, message) in cases.items():
        with pytest.raises(ArtifactError, match=message):
            CompressedLayer("w", "factored", layer.shape, {**layer.tensors, **change}, k=layer.k).delta()
    with pytest.raises(ArtifactError, match="width groups hold"):
        CompressedLayer("w", "factored", layer.shape, layer.tensors, k=layer.k + 1)


def test_deltacome_refuses_settings_it_cannot_honour():
    for field, value in (("extra_rank", 3), ("refit", 1), ("whiten", True)):
        with pytest.raises(ConfigError, match="deltacome"):
            CompressionConfig(method="deltacome", **{field: value})


def test_int4_fills_a_rank_8r_factorisation_by_default():
    assert CompressionConfig(rank=1, value_dtype="int4").k == 8
    assert CompressionConfig(rank=0.25, value_dtype="int4").k == 2


def test_int4_factors_are_charged_per_entry_and_fill_the_budget_as_int8_does():
    delta = structured_delta(96, 64)
    for value_dtype in ("int8", "int4"):
        layer = compress_matrix("w", delta, CompressionConfig(method="magtruncsvd", rank=1, value_dtype=value_dtype,
                                                              positions="bitmap"))
        entries = kept_entries(layer, "u.") + kept_entries(layer, "v.")
        bits = 8 if value_dtype == "int8" else 4
        assert layer.paper_bits == (96 + 64) * layer.k + 32 * 2 * layer.k + bits * entries
        assert layer.budget_bits - layer.paper_bits < 2 * (bits + 1)  # the budget is spent, not half of it
