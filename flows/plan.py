"""Plan one model's compression from headers: which tensors, in which layer groups, at what budget.

Plan, then execute: the flow builds an immutable :class:`ModelPlan` from the pair's safetensors
headers alone (no tensor is read), so work units and budgets are fixed before any SVD runs and
workers receive references (URIs and byte ranges), never tensors.

A layer group is a run of tensors from one shard of the fine-tune, in file order, packed until
their float32 working size reaches ``group_bytes``: one task per tensor would drown in
scheduling overhead, one task per model could not run in parallel. Every group becomes one
payload file of the delta.

Identities make reruns idempotent: a delta's id hashes everything that determines its bytes
(input content hashes, configuration, allocation, calibration data, library and format
versions); a catalog row's id adds the model's name and the evaluation data. Neither depends
on where the inputs live.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flows.fleet_config import DEFAULT_GROUP_BYTES
from osd_core import __version__
from osd_core.calibration_data import METRIC_STATISTICS
from osd_core.compress import plan_pair, uniform_budgets
from osd_core.config import CompressionConfig
from osd_core.manifest import FORMAT_VERSION
from osd_core.policy import Role
from osd_io.keys import join_key
from osd_io.sources import PairLayout, tensor_refs
from workers.jobs import LayerGroup, LayerJob

ARTIFACTS_PREFIX = "artifacts"
GRADIENTS_PREFIX = "gradients"
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ModelPlan:
    """Everything decided before work starts for one (model, configuration)."""

    model: str
    config: CompressionConfig
    groups: tuple[LayerGroup, ...]
    budgets: dict[str, int]  # the paper's uniform budget of every factorised tensor
    unknown: tuple[str, ...]

    @property
    def total_bits(self) -> int:
        """The model's bit budget: the sum of the uniform per-layer budgets."""
        return sum(self.budgets.values())

    @property
    def factorised(self) -> tuple[LayerJob, ...]:
        return tuple(layer for group in self.groups for layer in group.layers if layer.plan.action == "factorise")


def plan_model(
    model: str, pair: PairLayout, config: CompressionConfig, *, group_bytes: int = DEFAULT_GROUP_BYTES
) -> ModelPlan:
    """Pair the tensors, decide each one's action and budget, and cut the work into layer groups."""
    if group_bytes < 1:
        raise ValueError(f"group_bytes must be >= 1, got {group_bytes}")
    plans = plan_pair(pair.base, pair.finetuned, config)
    finetuned, base = tensor_refs(pair.finetuned), tensor_refs(pair.base)
    jobs = [
        LayerJob(plan, finetuned[plan.name], base.get(plan.name) if plan.action != "replace" else None)
        for plan in plans
        if plan.action != "copy"
    ]
    budgets = uniform_budgets(plans, config)
    unknown = tuple(plan.name for plan in plans if plan.role is Role.UNKNOWN)
    return ModelPlan(model, config, group_layers(jobs, group_bytes), budgets, unknown)


def group_layers(jobs: Sequence[LayerJob], group_bytes: int) -> tuple[LayerGroup, ...]:
    """Pack tensors shard by shard, in file order, into groups of about ``group_bytes`` (float32).

    A tensor larger than ``group_bytes`` gets a group of its own; no group spans two shards, so
    a worker's reads are nearby ranges of one object.
    """
    by_shard: dict[str, list[LayerJob]] = {}
    for job in jobs:
        by_shard.setdefault(job.finetuned.uri, []).append(job)
    groups: list[LayerGroup] = []
    for shard in sorted(by_shard):
        current: list[LayerJob] = []
        size = 0
        for job in sorted(by_shard[shard], key=lambda j: j.finetuned.start):
            weight = 4 * job.finetuned.numel
            if current and size + weight > group_bytes:
                groups.append(_group(len(groups), shard, current))
                current, size = [], 0
            current.append(job)
            size += weight
        if current:
            groups.append(_group(len(groups), shard, current))
    return tuple(groups)


def _group(index: int, shard: str, jobs: list[LayerJob]) -> LayerGroup:
    return LayerGroup(index, shard.rstrip("/").rpartition("/")[2], group_label([j.name for j in jobs]), tuple(jobs))


def group_label(names: Sequence[str]) -> str:
    """A short human name for a group: its blocks ("L0-3"), and other modules by name ("embeddings")."""
    blocks: list[int] = []
    others: list[str] = []
    for name in names:
        match = _BLOCK.search(name)
        if match:
            blocks.append(int(match.group(1)))
            continue
        parts = [p for p in name.split(".")[:-1] if p not in ("bert", "model", "transformer")]
        module = parts[0] if parts else name
        if module not in others:
            others.append(module)
    label = others[:]
    if blocks:
        low, high = min(blocks), max(blocks)
        label.insert(0, f"L{low}" if low == high else f"L{low}-{high}")
    return "+".join(label)


def delta_id(pair: PairLayout, config: CompressionConfig, allocation: str, calibration_sha256: str | None) -> str:
    """Hash of everything that determines a delta's content; its storage prefix derives from it."""
    return _digest(
        {
            "base": pair.base_identity["sha256"],
            "finetuned": pair.finetuned_identity["sha256"],
            "config": config.to_dict(),
            "allocation": allocation,
            "calibration": calibration_sha256 if config.needs_gradients else None,
            "osd_fleet": __version__,
            "format": FORMAT_VERSION,
        }
    )


def artifact_id(model: str, delta: str, eval_sha256: str | None, metric: str) -> str:
    """The catalog row's identity: one model's delta, evaluated on one data set with one metric."""
    return _digest({"model": model, "delta": delta, "eval_data": eval_sha256, "metric": metric})


def artifact_prefix(model: str, delta: str) -> str:
    """Store prefix of a delta: ``artifacts/<model>/<delta id>``."""
    return join_key(ARTIFACTS_PREFIX, model, delta[:24])


def gradient_key(
    model: str, pair: PairLayout, config: CompressionConfig, calibration_sha256: str, names: Sequence[str]
) -> str:
    """Store key of a model's calibration output; shared by every configuration that computes it alike."""
    point: dict[str, Any] = {"gradient_at": config.gradient_at, "statistics": METRIC_STATISTICS[config.metric]}
    if config.gradient_at == "reconstruction":  # the rank-k point depends on the factorisation
        point.update(k=config.k, svd=config.svd, power_iters=config.power_iters, seed=config.seed)
    digest = _digest(
        {
            "base": pair.base_identity["sha256"],
            "finetuned": pair.finetuned_identity["sha256"],
            "calibration": calibration_sha256,
            "point": point,
            "names": sorted(names),
            "osd_fleet": __version__,
        }
    )
    return join_key(GRADIENTS_PREFIX, model, f"{digest[:24]}.safetensors")


def _digest(value: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
