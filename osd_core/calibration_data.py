"""What calibration produces, as workers read it: gradients and output-error weights by name.

Kept apart from ``calibration`` (which runs a model through ``transformers``) so that compression
workers read calibration results with nothing but torch and safetensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .errors import MissingTensorError
from .byte_source import LocalDirectory
from .safetensors_io import read_header, read_tensor

ROW_WEIGHT = "row_weight"
INPUT_COV = "input_cov"
OUTPUT_FISHER = "output_fisher"
STATISTICS = (ROW_WEIGHT, INPUT_COV, OUTPUT_FISHER)
# What each output-error metric reads (``osd_core.compress.metric_weights``), so that calibration
# gathers only that: the input covariances are d×d per linear map, 522 MB for SmolLM2-135M's
# 538 MB of weights.
METRIC_STATISTICS: dict[str, tuple[str, ...]] = {
    "frobenius": (),
    "activation": (ROW_WEIGHT, INPUT_COV),
    "fisher": (ROW_WEIGHT, OUTPUT_FISHER),
    "kfac": STATISTICS,
}


class GradientFile(Mapping[str, torch.Tensor]):
    """A calibration file: gradients by tensor name, read one at a time on access, plus the
    the statistics of each tensor's output-error metric (``weights``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._source = LocalDirectory(self.path.parent)
        self._entries = read_header(self._source, self.path.name).tensors
        self._names = [name for name in self._entries if "::" not in name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise MissingTensorError(f"{self.path}: no gradient for tensor {name!r}")
        return read_tensor(self._source, self._entries[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def statistics(self, name: str) -> dict[str, torch.Tensor]:
        """Calibration statistics of tensor ``name`` (``row_weight``, ``input_cov``, ``output_fisher``)."""
        return {stat: read_tensor(self._source, self._entries[f"{name}::{stat}"])
                for stat in STATISTICS if f"{name}::{stat}" in self._entries}
