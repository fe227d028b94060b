"""Real base/fine-tune pairs and labelled data for testing and benchmarking delta compression.

Importing this package is cheap: ``build_workload``, ``load_workload`` and the evaluators (which
need torch and transformers) are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workloads.data import (
    DATASETS,
    Corpus,
    Splits,
    SplitSizes,
    load_corpus,
    load_splits,
    split_corpus,
)
from workloads.errors import (
    DataFormatError,
    MissingPackageError,
    ModelFormatError,
    UnknownWorkloadError,
    WorkloadError,
    WorkloadNotBuiltError,
)
from workloads.jsonl import Row, read_jsonl, write_jsonl
from workloads.recipes import WORKLOADS, Recipe

if TYPE_CHECKING:
    from workloads.build import Workload, build_workload, load_workload
    from workloads.evaluate import EvalResult, evaluate_checkpoint, evaluate_model, macro_f1

_LAZY = {
    "Workload": "workloads.build",
    "build_workload": "workloads.build",
    "load_workload": "workloads.build",
    "EvalResult": "workloads.evaluate",
    "evaluate_checkpoint": "workloads.evaluate",
    "evaluate_model": "workloads.evaluate",
    "macro_f1": "workloads.evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'workloads' has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "WORKLOADS",
    "Corpus",
    "DataFormatError",
    "EvalResult",
    "MissingPackageError",
    "ModelFormatError",
    "Recipe",
    "Row",
    "SplitSizes",
    "Splits",
    "UnknownWorkloadError",
    "Workload",
    "WorkloadError",
    "WorkloadNotBuiltError",
    "build_workload",
    "evaluate_checkpoint",
    "evaluate_model",
    "load_corpus",
    "load_splits",
    "load_workload",
    "macro_f1",
    "read_jsonl",
    "split_corpus",
    "write_jsonl",
]
