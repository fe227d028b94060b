"""Spend a model's bit budget across its layers where the bits buy the most.

The paper gives every matrix the same budget ``B = 32·r·(n+d)`` ("uniform"). The model's total,
``Σ B``, can be spent better ("global"): a layer whose delta is zero or nearly low-rank gains
little from its share, while another's error may still fall steeply. :func:`measure_curve` gives,
per layer, the damage (squared Frobenius error of the delta, so errors add up over the model)
at 0 bits and a few candidate budgets; :func:`allocate` then spends the total greedily by
marginal damage reduction per bit, and each layer is compressed with its allotted budget
(:func:`layer_config`). The fleet runs the measurements on workers and allocates in the flow;
``compress_checkpoint`` runs all three in one process.

"global-all" spends the same total over the 1-D deltas (biases, norms) as well, which the
uniform and "global" allocations store beside the budget at ``dense_dtype``: each is one more
layer whose options are dropping it or storing it whole at a width (:func:`measure_whole`).

Frobenius damage, not a loss-weighted one, on purpose: weighting each layer's error by
calibration statistics (output Fisher, input second moment, K-FAC) was measured and allocated
worse on validation data (README, "Results"), the same verdict as for importance masks.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from .budget import VALUE_BITS, layer_budget
from .config import CompressionConfig
from .errors import BudgetError, ConfigError
from .factorize import compress_matrix
from .finite import all_finite
from .norms import squared_norm
from .svd import truncated_svd
from .whole import whole_layer, whole_options

# Candidate budgets as multiples of the uniform one: enough resolution to move bits, few enough
# that measuring them stays cheap next to the compression itself.
MULTIPLIERS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


@dataclass(frozen=True, order=True)
class Option:
    """A layer compressed within ``bits`` leaves ``cost`` damage."""

    bits: int
    cost: float


@dataclass(frozen=True)
class Allocation:
    """Chosen budget per layer, with the total bits and total estimated damage."""

    budgets: dict[str, int]
    bits: int
    cost: float


def candidate_budgets(
    config: CompressionConfig, shape: tuple[int, int], multipliers: Sequence[float] = MULTIPLIERS
) -> tuple[int, ...]:
    """The non-zero budgets worth measuring for one ``n×d`` layer, ascending, with the uniform one.

    ``truncsvd`` can only spend whole ranks, so its candidates are ranks ``⌊m·r⌋`` at their exact
    cost. A relaxed method with the default ``c`` factors at the rank its budget fills
    (:func:`layer_config`), so every multiple is a candidate up to ``k = min(n, d)``. With a fixed
    ``extra_rank`` its ``k`` is fixed and no budget above the dense rank-k cost buys anything;
    ``sparse`` likewise stops at the dense matrix. Budget 0 (drop the layer's delta) is measured
    separately, by :func:`measure_curve`.
    """
    n, d = shape
    uniform = layer_budget(n, d, config.rank)
    if config.method == "truncsvd":
        ranks = {max(1, min(math.floor(m * config.rank), min(n, d))) for m in multipliers} | {config.rank}
        return tuple(sorted(layer_budget(n, d, r) for r in ranks))
    budgets = {max(1, round(m * uniform)) for m in multipliers} | {uniform}
    if not config.factorises:
        return tuple(sorted({min(b, VALUE_BITS * n * d) for b in budgets}))
    if config.extra_rank is not None:
        return tuple(sorted({min(b, VALUE_BITS * config.k * (n + d)) for b in budgets}))
    return tuple(sorted(b for b in budgets if layer_config(config, shape, b).k <= min(n, d)))


def layer_config(config: CompressionConfig, shape: tuple[int, ...], budget: int | None) -> CompressionConfig:
    """The configuration one layer is compressed with when an allocator gives it ``budget`` bits.

    The budget is read as the rank it pays for, ``budget / (32·(n+d))``: ``truncsvd`` spends it as
    whole ranks, and a relaxed method with the default ``c`` factors at the rank that budget fills
    (so a layer given more bits also gets more singular vectors, not only denser ones). A fixed
    ``extra_rank`` keeps ``k`` fixed; ``sparse`` has no rank. ``None`` or 0 leaves ``config`` as is,
    and so does a tensor stored whole (a budgeted 1-D delta's bits choose its width instead).
    """
    if not budget or len(shape) != 2 or not config.factorises \
            or (config.method != "truncsvd" and config.extra_rank is not None):
        return config
    n, d = shape
    rank = budget / (VALUE_BITS * (n + d))
    return replace(config, rank=max(1, math.floor(rank)) if config.method == "truncsvd" else rank)


def measure_curve(
    name: str,
    delta: torch.Tensor,
    config: CompressionConfig,
    grad: torch.Tensor | None = None,
    *,
    row_weight: torch.Tensor | None = None,
    input_cov: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Option, ...]:
    """Damage (squared Frobenius error of the delta, so errors add up over the model) of one layer
    at 0 bits and at each candidate budget. A zero delta costs nothing at zero bits.

    One truncated SVD at the largest candidate rank serves every candidate: each slices its
    leading ``k`` singular vectors from it instead of factoring the delta again. With the exact
    SVD that is exactly a rank-``k`` factorisation; with the randomized one (a larger sketch than
    the final compression at its own ``k`` uses) the measured damage can differ from the final
    one in the last digits, which ``bench/measuring_pass.py`` shows does not change the allocation.
    """
    norm2 = squared_norm(delta.float())
    options = [Option(0, norm2)]
    if norm2 == 0.0:
        return tuple(options)
    shape = tuple(delta.shape)
    candidates = [(budget, layer_config(config, shape, budget)) for budget in candidate_budgets(config, shape)]
    factors = None
    top = max((c.k for _, c in candidates), default=0)
    if config.factorises and not config.whiten and 0 < top <= min(shape):
        matrix = delta.to(device=device, dtype=torch.float32)
        if all_finite(matrix):  # a non-finite delta is refused below, by compress_matrix
            factors = truncated_svd(matrix, top, method=config.svd, power_iters=config.power_iters, seed=config.seed)
    for budget, layer in candidates:
        try:
            approx = compress_matrix(name, delta, layer, grad, budget_bits=budget, row_weight=row_weight,
                                     input_cov=input_cov, device=device, factors=factors)
        except BudgetError:
            continue  # too small to hold one entry per factor: not an option
        error = delta.float() - approx.delta().reshape(delta.shape).to(delta.device)
        options.append(Option(budget, squared_norm(error)))
    return tuple(options)


def measure_whole(name: str, delta: torch.Tensor, config: CompressionConfig) -> tuple[Option, ...]:
    """Damage of one 1-D delta at each of its whole-tensor options (``osd_core.whole``), the
    ``global-all`` allocation's counterpart of :func:`measure_curve`.

    The same squared error as a matrix's, on purpose: a bias or norm error ``e`` adds ``‖e‖²`` to
    the squared output error of every token, as a matrix error ``E`` adds ``‖E x‖²``, which is
    ``‖E‖²`` in expectation for inputs of unit second moment (what the norms before each layer make).
    """
    values = delta.reshape(-1).float()
    norm2 = squared_norm(values)
    if norm2 == 0.0:
        return (Option(0, 0.0),)
    options = []
    for bits in whole_options(values.numel(), config):
        stored = whole_layer(name, values, config, bits).delta(values.device).reshape(-1)
        options.append(Option(bits, squared_norm(values - stored)))
    return tuple(options)


def allocate(
    curves: Mapping[str, Sequence[Option]], total_bits: int, *, baseline: Mapping[str, int] | None = None
) -> Allocation:
    """Choose one option per layer with total bits ``<= total_bits``, greedily minimising total cost.

    Start every layer at its cheapest option, then repeatedly take the upgrade (to any larger
    option of one layer, so non-convex curves are handled) with the largest cost reduction per
    extra bit that still fits. With ``baseline`` (bits per layer, e.g. the uniform budgets), the
    result is never worse than taking, per layer, the best option within the baseline's bits.
    """
    options = {name: _normalise(name, curve) for name, curve in curves.items()}
    chosen = {name: 0 for name in options}
    spent = sum(opts[0].bits for opts in options.values())
    if spent > total_bits:
        raise BudgetError(
            f"the cheapest options of {len(options)} layers need {spent} bits, more than the total {total_bits}"
        )
    heap: list[tuple[float, str, int, int]] = []
    for name in sorted(options):
        _push(heap, name, options[name], 0, total_bits - spent)
    while heap:
        _, name, at, target = heapq.heappop(heap)
        if chosen[name] != at:
            continue  # stale: the layer moved since this upgrade was computed
        opts = options[name]
        extra = opts[target].bits - opts[at].bits
        if extra > total_bits - spent:  # no longer fits: offer this layer's best upgrade that does
            _push(heap, name, opts, at, total_bits - spent)
            continue
        chosen[name], spent = target, spent + extra
        _push(heap, name, opts, target, total_bits - spent)
    result = _result({name: options[name][i] for name, i in chosen.items()})
    if baseline is not None:
        fallback = best_within(options, baseline)
        if fallback.bits <= total_bits and fallback.cost < result.cost:
            return fallback
    return result


def spend_globally(
    curves: Mapping[str, Sequence[Option]], uniform: Mapping[str, int], beside: Mapping[str, int] | None = None
) -> tuple[Allocation, float]:
    """The global allocation both executors run, and the uniform allocation's estimated cost to compare.

    The total is the uniform budgets' (``32·r·(n+d)`` per factorised matrix), spent by
    :func:`allocate` with the uniform budgets as its floor. ``beside`` gives the bits the uniform
    allocation stores outside that total (1-D deltas at ``dense_dtype``) for the tensors whose
    curves a ``global-all`` allocation also spends the total on: part of the yardstick, never of the total.
    """
    baseline = {**uniform, **(beside or {})}
    return allocate(curves, sum(uniform.values()), baseline=baseline), best_within(curves, baseline).cost


def _normalise(name: str, curve: Sequence[Option]) -> list[Option]:
    """Options by ascending bits, one per bit count (the cheaper), all finite and non-negative."""
    if not curve:
        raise ConfigError(f"layer {name!r} has no budget options to choose from")
    best: dict[int, float] = {}
    for option in curve:
        if option.bits < 0 or not math.isfinite(option.cost) or option.cost < 0:
            raise ConfigError(f"layer {name!r}: option {option} must have bits >= 0 and a finite cost >= 0")
        best[option.bits] = min(option.cost, best.get(option.bits, math.inf))
    return [Option(bits, cost) for bits, cost in sorted(best.items())]


def _push(heap: list[tuple[float, str, int, int]], name: str, opts: list[Option], at: int, room: int) -> None:
    """Queue the layer's best affordable upgrade from option ``at``: max reduction per bit, then the larger."""
    best: tuple[float, int] | None = None
    for target in range(at + 1, len(opts)):
        extra, gain = opts[target].bits - opts[at].bits, opts[at].cost - opts[target].cost
        if extra > room or gain <= 0:
            continue
        if best is None or gain / extra >= best[0]:
            best = (gain / extra, target)
    if best is not None:
        heapq.heappush(heap, (-best[0], name, at, best[1]))


def best_within(curves: Mapping[str, Sequence[Option]], limits: Mapping[str, int]) -> Allocation:
    """Per layer the least-cost option within its limit (the cheapest one where none fits).

    With the uniform budgets as limits this is what the uniform allocation achieves on the same
    curves: the yardstick a global allocation is reported against.
    """
    picked = {}
    for name, curve in curves.items():
        opts = _normalise(name, curve)
        fitting = [o for o in opts if o.bits <= limits.get(name, 0)] or opts[:1]
        picked[name] = min(fitting, key=lambda o: (o.cost, o.bits))
    return _result(picked)


def _result(picked: Mapping[str, Option]) -> Allocation:
    return Allocation(
        {name: option.bits for name, option in sorted(picked.items())},
        sum(o.bits for o in picked.values()),
        sum(o.cost for o in picked.values()),
    )
