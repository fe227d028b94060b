"""Compress one delta matrix with one method under the per-layer bit budget.

This is the paper's method and its baselines, each a few lines over shared pieces (budget counts,
truncated SVD, top-s masks), so they differ only where the methods differ:

- ``truncsvd``: rank r, dense factors; its cost defines the budget B = 32·r·(n+d).
- ``magtruncsvd``: rank k = r + c, keep the largest-magnitude entries of both factors.
- ``osd``: rank k, keep the entries with the largest first-order Taylor estimate of the loss
  change caused by zeroing them: ``|U ⊙ (G·V)|`` and ``|V ⊙ (Gᵀ·U)|`` for the layer gradient G.
- ``sparse``: keep the largest-magnitude entries of the delta itself.
- ``dare``: keep random entries of the delta, rescaled (DARE, a method users pick instead; see ``_dare``).
- ``bitdelta``: the sign of every entry and one scale per matrix (BitDelta, a peer; see ``_signs``).
- ``deltacome``: whole singular vectors at 8, 4 or 2 bits, more for larger σ (Delta-CoMe, a peer;
  see ``_mixed_widths``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .budget import (
    PAPER,
    Encoding,
    equal_density_counts,
    factored_bits,
    layer_budget,
    require_entries,
    sparse_bits,
    sparse_count,
)
from .config import SCALED_DTYPES, SEED_LIMIT, CompressionConfig
from .errors import BudgetError, CheckpointError, ConfigError
from .finite import all_finite, count_non_finite, value_range
from .layer import INT_LEVELS, WIDTH_GROUPS, CompressedLayer, index_dtype, pack_bitmap, to_levels
from .svd import Factors, truncated_svd

T = TypeVar("T")


def compress_matrix(
    name: str,
    delta: torch.Tensor,
    config: CompressionConfig,
    grad: torch.Tensor | None = None,
    *,
    budget_bits: int | None = None,
    row_weight: torch.Tensor | None = None,
    input_cov: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    factors: Factors | None = None,
    known_range: tuple[float, float] | None = None,
) -> CompressedLayer:
    """Compress the 2-D ``delta`` of tensor ``name`` within ``32·rank·(n+d)`` paper bits.

    ``grad`` is the task-loss gradient with respect to this weight (same shape), required by
    ``osd``. ``budget_bits`` overrides the uniform per-layer budget (a model-level allocator
    spends bits unevenly). ``row_weight`` (n) and ``input_cov`` (d×d) define the output error a
    delta error causes (from calibration; see ``OutputMetric``); they default to plain Frobenius.
    Work runs on ``device`` (a GPU
    when available); the record is returned on the CPU. ``factors``, a truncated SVD of this
    ``delta`` at rank ``>= k`` (not whitened), is sliced instead of factoring again: a measuring
    pass that tries several budgets of one layer pays for one SVD, not one per budget.
    ``known_range`` is ``delta``'s smallest and largest value where the caller took them as it
    made the delta (``float_delta.DeltaSummary``): a pass over the matrix saved.
    """
    if delta.ndim != 2:
        raise ConfigError(f"{name}: only 2-D matrices are factorised, got shape {tuple(delta.shape)}")
    n, d = delta.shape
    if budget_bits is not None and budget_bits < 0:
        raise ConfigError(f"{name}: budget_bits must be >= 0, got {budget_bits}")
    if budget_bits == 0:  # an allocator chose to drop this layer's delta
        return CompressedLayer(name, "zero", (n, d), budget_bits=0)
    budget = layer_budget(n, d, config.rank) if budget_bits is None else budget_bits
    if budget == 0:
        raise BudgetError(f"{name}: rank {config.rank} gives its {n}x{d} delta a budget of 0 bits; raise --rank")
    if config.factorises and config.k > min(n, d):
        raise ConfigError(
            f"{name}: rank k = {config.k} exceeds min(n, d) = {min(n, d)} of its {n}x{d} delta"
        )
    with torch.no_grad():
        delta = delta.to(device=device, dtype=torch.float32)
        low, high = value_range(delta) if known_range is None else known_range  # zero? finite?
        if not (math.isfinite(low) and math.isfinite(high)):
            _require_finite(name, "delta", delta)
        if low == 0.0 and high == 0.0:
            return CompressedLayer(name, "zero", (n, d), budget_bits=budget)
        if config.method == "bitdelta":
            return _signs(name, delta, budget)
        if not config.factorises:
            return _sparse(name, delta, budget, config)
        if config.method == "deltacome":
            return _mixed_widths(name, delta, budget, config, factors)
        metric = OutputMetric.build(name, (n, d), row_weight, input_cov, device)
        u, v = _factor(name, delta, config, metric, factors)
        if config.method == "truncsvd":
            return _factored(name, (n, d), u, v, None, None, budget, config, config.encodings[0])
        if config.method == "impart":
            return _impart(name, (n, d), u, v, budget, config)
        if config.method == "magtruncsvd":
            score_u, score_v = u.abs(), v.abs()
        elif config.importance == "damage":
            score_u, score_v = damage_scores(u, v, metric)
        else:
            if grad is None:
                raise ConfigError(f"{name}: method 'osd' needs the layer's loss gradient; none was given")
            if tuple(grad.shape) != (n, d):
                raise CheckpointError(f"{name}: gradient has shape {tuple(grad.shape)}, expected {(n, d)}")
            grad = grad.to(device=device, dtype=torch.float32)
            _require_finite(name, "gradient", grad)
            score_u, score_v = taylor_scores(u, v, grad)
        (s_u, s_v), encoding = _most_entries(
            config.encodings, lambda enc: _counts(score_u, score_v, budget, config, enc), total=sum
        )
        keep_u, keep_v = _top(score_u, s_u), _top(score_v, s_v)
        if config.refit:
            u, v = refit_kept(delta, u, v, keep_u, keep_v, metric, rounds=config.refit)
        return _factored(name, (n, d), u, v, keep_u, keep_v, budget, config, encoding)


def _most_entries(encodings: tuple[Encoding, ...], counts: Callable[[Encoding], T],
                  total: Callable[[T], int]) -> tuple[T, Encoding]:
    """The counts (and encoding) that keep the most entries; an encoding that fits none is skipped."""
    fitted, refusal = [], None
    for encoding in encodings:
        try:
            fitted.append((counts(encoding), encoding))
        except BudgetError as exc:
            refusal = exc
    if not fitted:
        raise refusal  # type: ignore[misc]
    return max(fitted, key=lambda found: total(found[0]))


def _counts(score_u: torch.Tensor, score_v: torch.Tensor, budget: int, config: CompressionConfig,
            encoding: Encoding) -> tuple[int, int]:
    """Kept entries of each factor under ``encoding``: equal density, or ranked jointly by score."""
    if config.factor_split == "joint":
        return joint_counts(score_u.cpu(), score_v.cpu(), budget, encoding)
    return equal_density_counts(score_u.shape[0], score_v.shape[0], config.k, budget, encoding)


# Calibration statistics are normalised to mean 1 and floored (a ridge for the covariance), so rows
# and directions that calibration never touched still count: evaluation data will touch some.
WEIGHT_FLOOR = 0.05


@dataclass(frozen=True)
class OutputMetric:
    """The weighted error ``Σ_i r_i (E C Eᵀ)_ii`` of an error ``E`` in a layer's delta.

    ``r`` weighs output rows (token frequency, for embedding tables read by row) and ``C`` is the
    input second moment ``E[x xᵀ]`` of a linear map (``None``: identity), so the metric is the
    squared output error the delta's error causes on calibration-like inputs.
    """

    rows: torch.Tensor
    cov: torch.Tensor | None

    @classmethod
    def build(cls, name: str, shape: tuple[int, int], rows: torch.Tensor | None, cov: torch.Tensor | None,
              device) -> OutputMetric:
        n, d = shape
        if rows is None:
            weights = torch.ones(n, device=device)
        else:
            weights = rows.to(device=device, dtype=torch.float32).reshape(-1)
            if weights.numel() != n or not all_finite(weights) or bool((weights < 0).any()):
                raise CheckpointError(f"{name}: row weights must be {n} finite non-negative numbers")
            mean = weights.mean()
            weights = (weights / mean).clamp_min(WEIGHT_FLOOR) if mean > 0 else torch.ones(n, device=device)
        if cov is not None:
            cov = cov.to(device=device, dtype=torch.float32)
            if tuple(cov.shape) != (d, d) or not all_finite(cov):
                raise CheckpointError(f"{name}: input covariance must be a finite {d}x{d} matrix")
            scale = torch.diagonal(cov).mean()
            if scale > 0:
                cov = (cov + cov.T) / (2 * scale) + WEIGHT_FLOOR * torch.eye(d, device=device)
            else:
                cov = None
        return cls(weights, cov)

    def col_diag(self, d: int) -> torch.Tensor:
        return torch.ones(d, device=self.rows.device) if self.cov is None else torch.diagonal(self.cov)

    def times_cov(self, x: torch.Tensor) -> torch.Tensor:
        """``C @ x`` (x has d rows)."""
        return x if self.cov is None else self.cov @ x


def _factor(name: str, delta: torch.Tensor, config: CompressionConfig, metric: OutputMetric,
            factors: Factors | None = None):
    """Rank-k factors with Σ folded in; with ``whiten`` the SVD minimises the weighted error.

    Whitening (as in SVD-LLM): with ``C = L Lᵀ``, the best rank-k ``Δ̂`` in the metric is
    ``P_k(R^½ Δ L) L⁻¹ R^-½``; the factors are ``U = R^-½ Ũ`` and ``V = L⁻ᵀ W̃``.
    """
    if factors is not None:
        k = config.k
        if config.whiten or factors.u.shape[0] != delta.shape[0] or factors.v.shape[0] != delta.shape[1] \
                or factors.s.numel() < k:
            raise ConfigError(f"{name}: precomputed factors of rank {factors.s.numel()} do not fit a rank-{k} "
                              f"{'whitened ' if config.whiten else ''}factorisation of its {tuple(delta.shape)} delta")
        sliced = Factors(factors.u[:, :k].to(delta.device), factors.s[:k].to(delta.device),
                         factors.v[:, :k].to(delta.device))
        return split_sigma(sliced, config.sigma)
    svd = dict(method=config.svd, power_iters=config.power_iters, seed=config.seed)
    if not config.whiten:
        return split_sigma(truncated_svd(delta, config.k, **svd), config.sigma)
    root_r = metric.rows.sqrt()
    chol = torch.linalg.cholesky(metric.cov) if metric.cov is not None else None
    weighted = root_r[:, None] * delta
    if chol is not None:
        weighted = weighted @ chol
    factors = truncated_svd(weighted, config.k, **svd)
    v = factors.v
    if chol is not None:
        v = torch.linalg.solve_triangular(chol.T, v, upper=True)
    return split_sigma(Factors(factors.u / root_r[:, None], factors.s, v), config.sigma)


def damage_scores(u: torch.Tensor, v: torch.Tensor, metric: OutputMetric) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted output error caused by zeroing each factor entry alone (its square root).

    Zeroing ``U[i, l]`` removes ``U[i, l] · V[:, l]ᵀ`` from row ``i`` of the product, costing
    ``r_i · U[i, l]² · V[:, l]ᵀ C V[:, l]`` of error; zeroing ``V[j, l]`` costs
    ``C_jj · V[j, l]² · Σ_i r_i U[i, l]²``. The importance of an entry of one factor thus depends
    on the other factor ("interleaved"), the two are commensurate (they can be ranked jointly),
    and neither depends on how Σ is split.
    """
    reach_v = (v * metric.times_cov(v)).sum(0).clamp_min(0).sqrt()
    reach_u = (metric.rows[:, None] * u * u).sum(0).sqrt()
    col = metric.col_diag(v.shape[0]).sqrt()
    return u.abs() * metric.rows.sqrt()[:, None] * reach_v[None, :], v.abs() * col[:, None] * reach_u[None, :]


def refit_kept(
    delta: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    keep_u: torch.Tensor,
    keep_v: torch.Tensor,
    metric: OutputMetric,
    *,
    rounds: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-fit the kept values by alternating weighted least squares; masks stay fixed.

    Masking leaves the surviving values at their SVD values, which were optimal only with every
    entry present. With ``V`` fixed each row of ``U`` solves a k×k system over its kept entries;
    with ``U`` fixed the rows of ``V`` are coupled through ``C`` and are solved by conjugate
    gradients over the kept entries. Every round lowers the weighted output error. One shot, no
    training.
    """
    mask_u, mask_v = _mask(keep_u, u), _mask(keep_v, v)
    u, v = u * mask_u, v * mask_v
    rows = metric.rows
    for _ in range(rounds):
        cv = metric.times_cov(v)
        u = _masked_least_squares(v.T @ cv, delta @ cv, mask_u)
        gram = (u * rows[:, None]).T @ u
        rhs = delta.T @ (u * rows[:, None])
        if metric.cov is None:
            v = _masked_least_squares(gram, rhs, mask_v)
        else:
            v = _masked_cg(lambda p, g=gram: metric.cov @ p @ g, metric.cov @ rhs, v, mask_v)
    return u, v


def _masked_cg(apply, rhs: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """Conjugate gradients for ``apply(X) = rhs`` over the entries where ``mask`` is 1."""
    x = start * mask
    residual = (rhs - apply(x)) * mask
    direction = residual.clone()
    norm = (residual * residual).sum()
    target = 1e-10 * float((rhs * rhs * mask).sum())
    for _ in range(iters):
        if float(norm) <= target:
            break
        step_dir = apply(direction) * mask
        alpha = norm / (direction * step_dir).sum().clamp_min(1e-30)
        x = x + alpha * direction
        residual = residual - alpha * step_dir
        new_norm = (residual * residual).sum()
        direction = residual + (new_norm / norm.clamp_min(1e-30)) * direction
        norm = new_norm
    return x


def _mask(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(like.numel(), device=like.device, dtype=like.dtype)
    mask[keep.to(like.device, torch.int64)] = 1
    return mask.view_as(like)


def _masked_least_squares(gram: torch.Tensor, rhs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise ``argmin_x ‖·‖`` of ``x G xᵀ - 2 x·b`` over each row's kept entries (others zero)."""
    k = gram.shape[0]
    ridge = 1e-6 * float(torch.diagonal(gram).mean().clamp_min(1e-30))
    eye = torch.eye(k, device=gram.device, dtype=gram.dtype)
    systems = gram[None] * (mask[:, :, None] * mask[:, None, :]) + torch.diag_embed(1 - mask) + ridge * eye
    return torch.linalg.solve(systems, (rhs * mask).unsqueeze(-1)).squeeze(-1) * mask


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
    """Flat positions of the ``count`` highest scores, ascending (ties broken by position).

    A selection, not a sort: the ``count``-th largest score splits the kept from the rest, and
    only scores equal to it are taken in position order. The same positions a stable descending
    sort keeps, 6× faster on a 32000×64 factor (a full sort was 2 s of a 7B-shaped layer pair).
    """
    flat = score.reshape(-1)
    if count >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    if count <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    threshold = torch.kthvalue(flat, flat.numel() - count + 1).values
    keep = flat > threshold
    keep[(flat == threshold).nonzero().reshape(-1)[: count - int(keep.sum())]] = True
    return keep.nonzero().reshape(-1)


def _factored(
    name: str,
    shape: tuple[int, int],
    u: torch.Tensor,
    v: torch.Tensor,
    keep_u: torch.Tensor | None,
    keep_v: torch.Tensor | None,
    budget: int,
    config: CompressionConfig,
    encoding: Encoding,
) -> CompressedLayer:
    (n, d), k = shape, u.shape[1]
    tensors = {**_encode(u, keep_u, config.stored_dtype, encoding, "u."),
               **_encode(v, keep_v, config.stored_dtype, encoding, "v.")}
    kept_u = n * k if keep_u is None else keep_u.numel()  # entries, not stored elements (int4 packs two)
    kept_v = d * k if keep_v is None else keep_v.numel()
    bits = factored_bits(n, d, k, kept_u, kept_v, encoding)
    return CompressedLayer(name, "factored", shape, tensors, k=k, budget_bits=budget, paper_bits=bits)


def _encode(matrix: torch.Tensor, keep: torch.Tensor | None, value_dtype: str, encoding: Encoding,
            prefix: str) -> dict[str, torch.Tensor]:
    """The payload parts of the kept entries of ``matrix`` (flat positions ``keep``; ``None``: all).

    A matrix kept whole stores no positions (an empty index). Integer values are scaled per column
    so that the column's largest kept magnitude maps to the top level (127 for int8, 7 for int4,
    packed two to a byte: ``to_levels``).
    """
    rows, cols = matrix.shape
    flat = matrix.reshape(-1)
    whole = keep is None or keep.numel() == flat.numel()
    keep = torch.arange(flat.numel(), device=flat.device) if whole else keep.to(flat.device)
    parts: dict[str, torch.Tensor] = {}
    if whole or encoding.positions == "index":
        index = torch.empty(0) if whole else keep
        parts[f"{prefix}index"] = index.to(device="cpu", dtype=index_dtype(flat.numel()))
    else:
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        mask[keep] = True
        parts[f"{prefix}bitmap"] = pack_bitmap(mask).cpu()
    values = flat[keep]
    if value_dtype in SCALED_DTYPES:
        column = keep % cols
        peak = torch.zeros(cols, device=flat.device).scatter_reduce(0, column, values.abs(), "amax")
        scale = peak / INT_LEVELS[value_dtype]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        parts[f"{prefix}values"] = to_levels(values, safe[column], value_dtype).cpu()
        parts[f"{prefix}scale"] = scale.float().cpu()
    else:
        parts[f"{prefix}values"] = values.to(getattr(torch, value_dtype)).cpu().clone()
    return parts


def _sparse(name: str, delta: torch.Tensor, budget: int, config: CompressionConfig) -> CompressedLayer:
    """The delta's own entries that fit the budget: the largest (``sparse``), or random ones (``dare``)."""
    n, d = delta.shape
    kept, encoding = _most_entries(config.encodings, lambda enc: sparse_count(n, d, budget, enc), total=int)
    if config.method == "dare":
        keep, values = _dare(name, delta, kept, config.seed)
    else:
        keep, values = _top(delta.abs(), kept), delta
    parts = _encode(values, keep, config.stored_dtype, encoding, "")
    return CompressedLayer(
        name, "sparse", (n, d), parts, budget_bits=budget, paper_bits=sparse_bits(n, d, kept, encoding),
    )


def _signs(name: str, delta: torch.Tensor, budget: int) -> CompressedLayer:
    """BitDelta (Liu et al., 2024): the sign of every entry times one scale, the mean magnitude.

    The mean ``|Δ|`` is the scale that minimises the Frobenius error of a sign approximation, and is
    the paper's starting point; its second step, distilling the scales against the fine-tune's
    outputs, is not done here. One bit per entry whatever the budget: ``paper_bits`` says what it
    cost, which at small ranks is many times the budget.
    """
    scale = delta.abs().mean().reshape(1).to(torch.float32).cpu()
    bitmap = pack_bitmap((delta > 0).cpu())
    return CompressedLayer(name, "sign", tuple(delta.shape), {"bitmap": bitmap, "scale": scale},
                           budget_bits=budget, paper_bits=delta.numel() + 32)


def _dare(name: str, delta: torch.Tensor, kept: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DARE (Yu et al., 2024, "Language Models are Super Mario"): keep ``kept`` entries drawn at random
    and rescale them by ``numel / kept``, so the expected delta is the delta itself.

    Faithful to the paper in the drop-and-rescale rule; different in two ways. The keep count comes
    from the bit budget (values plus positions, as every method here is charged) instead of a
    fixed drop rate, and exactly that many entries are kept, not each one with probability 1 − p.
    The draw is seeded by ``seed`` and the tensor's name, so a delta is reproducible.
    """
    numel = delta.numel()
    if kept >= numel:
        return torch.arange(numel, device=delta.device), delta
    keep = torch.randperm(numel, generator=_generator(seed, name))[:kept].sort().values.to(delta.device)
    return keep, delta * (numel / kept)


def _impart(name: str, shape: tuple[int, int], u: torch.Tensor, v: torch.Tensor, budget: int,
            config: CompressionConfig) -> CompressedLayer:
    """ImPart (Yang et al., 2025): sparsify each singular vector at a density that follows its singular value.

    Faithful to the paper in its two rules: a singular vector pair with a larger ``σ_i`` keeps
    more of its entries, and the entries kept are drawn at random and rescaled by the inverse of
    their vector's keep ratio, as DARE does for the whole delta, so each factor is unbiased.
    Different in three ways. The density is proportional to ``σ_i`` (capped at 1), where the
    paper shapes it with hyperparameters tuned per task. The total kept entries come from the bit
    budget, as for every method here (equal density in ``u`` and ``v``), instead of a target
    sparsity. Values are stored in the configured encoding (int8 by default), not the paper's own
    quantisation step. The draw is seeded by ``seed`` and the tensor's name.
    """
    sigma = u.norm(dim=0) * v.norm(dim=0)  # ‖u_i‖·‖v_i‖ = σ_i however Σ was split
    (s_u, s_v), encoding = _most_entries(config.encodings, lambda enc: _counts(u, v, budget, config, enc), total=sum)
    keep_u, u = _spectral_draw(u, s_u, sigma, _generator(config.seed, name + "/u"))
    keep_v, v = _spectral_draw(v, s_v, sigma, _generator(config.seed, name + "/v"))
    return _factored(name, shape, u, v, keep_u, keep_v, budget, config, encoding)


def _spectral_draw(factor: torch.Tensor, count: int, sigma: torch.Tensor, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random entries of ``factor``, spread over its columns in proportion to ``sigma``, each
    column rescaled by rows / kept: the kept flat positions (ascending) and the rescaled factor."""
    rows, k = factor.shape
    per_column = proportional_counts(sigma.cpu(), count, rows)
    keep = [torch.randperm(rows, generator=generator)[:kept] * k + column
            for column, kept in enumerate(per_column.tolist()) if kept]
    flat = torch.cat(keep).sort().values if keep else torch.empty(0, dtype=torch.long)
    scale = torch.where(per_column > 0, rows / per_column.clamp(min=1).float(), torch.zeros(k))
    return flat.to(factor.device), factor * scale.to(factor.device)


def proportional_counts(weights: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    """Integer counts ``≈ t·weights``, each at most ``cap``, summing to ``min(total, cap·positive weights)``."""
    positive = weights > 0
    if total >= cap * int(positive.sum()):
        return torch.where(positive, cap, 0).long()

    def fill(t: float) -> torch.Tensor:
        return torch.minimum((t * weights).floor(), torch.tensor(float(cap))).long()
    low, high = 0.0, cap / float(weights[positive].min())  # fill(high) keeps every positive column whole
    for _ in range(64):
        middle = (low + high) / 2
        low, high = (middle, high) if int(fill(middle).sum()) <= total else (low, middle)
    counts = fill(low)
    short = total - int(counts.sum())  # fewer than the columns that step up together between low and high
    if short:
        room = torch.nonzero(positive & (counts < cap)).flatten()
        counts[room[torch.argsort(weights[room], descending=True, stable=True)[:short]]] += 1
    return counts


# Clipping ratios tried for each column's scale (of its peak magnitude): at 2 bits the error is
# least near a third of the peak, where most entries still round to ±1; at 8 bits, at the peak.
CLIP_RATIOS = torch.linspace(0.1, 1.0, 19)
GROUP_BITS = {"int8": 8, "int4": 4, "int2": 2}  # the value width of each group in layer.WIDTH_GROUPS


def _mixed_widths(name: str, delta: torch.Tensor, budget: int, config: CompressionConfig,
                  factors: Factors | None) -> CompressedLayer:
    """Delta-CoMe (Ping et al., 2024): whole singular vectors, quantised with more bits for larger σ.

    Faithful to the paper in its rule: the delta's singular vectors are kept dense and quantised at
    mixed precision, the widest widths for the leading singular values, the rest narrower or dropped,
    training-free. Different in three ways. The widths are 8, 4 and 2 bits (the paper's 8/3/2; 3-bit
    fields do not pack into bytes). How many vectors get each width is chosen per layer by a greedy
    rate-distortion allocation under the bit budget, each step buying the upgrade (drop → 2 → 4 → 8
    bits) with the most error removed per bit, where the paper fixes the split by hand per model;
    the error of a vector at a width is measured, ``σ²`` times the relative quantisation errors of its
    two sides. Values are symmetric integers with one float32 scale per vector, its clipping chosen
    for the least squared error (``CLIP_RATIOS``), not the paper's GPTQ group quantisation.
    Charged like every method: ``(n+d)·bits`` per vector plus two 32-bit scales.
    """
    n, d = delta.shape
    cost = {dtype: (n + d) * GROUP_BITS[dtype] + 2 * 32 for dtype in WIDTH_GROUPS.values()}
    columns = min(n, d, config.k, budget // cost["int2"])
    if columns < 1:
        raise BudgetError(f"{name}: a budget of {budget} bits cannot hold one 2-bit singular vector pair of its "
                          f"{n}x{d} delta ({cost['int2']} bits); raise the rank")
    if factors is None or factors.s.numel() < columns:
        factors = truncated_svd(delta, columns, method=config.svd, power_iters=config.power_iters, seed=config.seed)
    sliced = Factors(factors.u[:, :columns].to(delta.device), factors.s[:columns].to(delta.device),
                     factors.v[:, :columns].to(delta.device))
    u, v = split_sigma(sliced, "sqrt")
    fits = {dtype: (_column_fit(u, dtype), _column_fit(v, dtype)) for dtype in WIDTH_GROUPS.values()}
    energy = sliced.s.double().cpu() ** 2
    widths = _allocate_widths(energy, {dtype: energy * (eu + ev).double().cpu()
                                       for dtype, ((_, eu), (_, ev)) in fits.items()}, cost, budget)
    tensors: dict[str, torch.Tensor] = {}
    kept, bits = 0, 0
    for group, dtype in WIDTH_GROUPS.items():
        chosen = [i for i, width in enumerate(widths) if width == dtype]
        if not chosen:
            continue
        cols = torch.tensor(chosen, device=u.device)
        (scale_u, _), (scale_v, _) = fits[dtype]
        tensors |= _whole_columns(u[:, cols], scale_u[cols], dtype, f"{group}u.")
        tensors |= _whole_columns(v[:, cols], scale_v[cols], dtype, f"{group}v.")
        kept += len(chosen)
        bits += cost[dtype] * len(chosen)
    return CompressedLayer(name, "factored", (n, d), tensors, k=kept, budget_bits=budget, paper_bits=bits)


def _column_fit(matrix: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's scale at ``dtype`` with the least squared error over ``CLIP_RATIOS``, and that
    error relative to the column's squared norm."""
    top = INT_LEVELS[dtype]
    peak = matrix.abs().amax(0).clamp_min(torch.finfo(torch.float32).tiny)
    best_scale, best_error = peak / top, torch.full_like(peak, math.inf)
    for ratio in CLIP_RATIOS.tolist():
        scale = peak * ratio / top
        error = ((matrix / scale).round().clamp(-top, top) * scale - matrix).square().sum(0)
        better = error < best_error
        best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    return best_scale, best_error / matrix.square().sum(0).clamp_min(torch.finfo(torch.float32).tiny)


def _allocate_widths(energy: torch.Tensor, damage: dict[str, torch.Tensor], cost: dict[str, int],
                     budget: int) -> list[str | None]:
    """Each vector's width (``None``: dropped) by greedy upgrades, most error removed per bit first,
    while the bits last. ``energy`` (σ²) is a vector's error when dropped, ``damage`` at each width."""
    options = [None, *sorted(cost, key=cost.get)]
    bits = np.array([0, *(cost[o] for o in options[1:])], dtype=np.int64)
    error = np.stack([energy.numpy(), *(damage[o].numpy() for o in options[1:])], axis=1)
    level = np.zeros(len(energy), dtype=np.int64)
    rows = np.arange(len(energy))
    spent = 0
    while True:
        extra = bits[None, :] - bits[level][:, None]
        gain = error[rows, level][:, None] - error
        feasible = (extra > 0) & (extra <= budget - spent) & (gain > 0)
        if not feasible.any():
            return [options[i] for i in level]
        per_bit = np.where(feasible, gain / np.maximum(extra, 1), -np.inf)
        row, choice = np.unravel_index(int(np.argmax(per_bit)), per_bit.shape)
        spent += int(extra[row, choice])
        level[row] = choice


def _whole_columns(matrix: torch.Tensor, scale: torch.Tensor, dtype: str, prefix: str) -> dict[str, torch.Tensor]:
    """The parts of ``matrix`` kept whole at ``dtype``, each column a multiple of its ``scale``."""
    column = torch.arange(matrix.numel(), device=matrix.device) % matrix.shape[1]
    return {f"{prefix}index": torch.empty(0, dtype=index_dtype(matrix.numel())),
            f"{prefix}values": to_levels(matrix.reshape(-1), scale[column], dtype).cpu(),
            f"{prefix}scale": scale.float().cpu()}


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) % SEED_LIMIT)


def _require_finite(name: str, what: str, tensor: torch.Tensor) -> None:
    if not all_finite(tensor):
        bad = count_non_finite(tensor)
        raise CheckpointError(f"{name}: {what} contains {bad} NaN or Inf values; expected finite numbers")


def joint_counts(
    score_u: torch.Tensor, score_v: torch.Tensor, budget: int, encoding: Encoding = PAPER
) -> tuple[int, int]:
    """Counts that keep the highest-scoring entries of both factors together within ``budget``.

    Scores of ``U`` and ``V`` must be commensurate (the Taylor estimates of loss change are). The
    entries are ranked jointly and taken in order while the bits stay within budget; the best
    entry of each factor always comes first, since a factor with nothing kept zeroes the product.
    When the whole factorisation fits it is kept whole.
    """
    (n, k), (d, _) = score_u.shape, score_v.shape
    if factored_bits(n, d, k, n * k, d * k, encoding) <= budget:
        return n * k, d * k
    cost_u, cost_v = encoding.entry_bits(n, k), encoding.entry_bits(d, k)
    free = budget - encoding.fixed_bits(n, k) - encoding.fixed_bits(d, k)
    scores = torch.cat([score_u.reshape(-1), score_v.reshape(-1)]).float()
    scores[int(score_u.reshape(-1).argmax())] = float("inf")
    scores[n * k + int(score_v.reshape(-1).argmax())] = float("inf")
    from_u = torch.cat([torch.ones(n * k, dtype=torch.bool), torch.zeros(d * k, dtype=torch.bool)])
    order = torch.argsort(scores, descending=True, stable=True)
    costs = torch.where(from_u[order], cost_u, cost_v).to(torch.int64)
    taken = int(torch.searchsorted(torch.cumsum(costs, 0), max(free, 0), right=True))
    s_u = min(int(from_u[order[:taken]].sum()), n * k - 1)
    s_v = min(taken - int(from_u[order[:taken]].sum()), d * k - 1)
    require_entries(s_u, s_v, n, d, k, budget)
    return s_u, s_v
