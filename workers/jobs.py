"""Job specs and result records that travel between the flow and Ray workers.

Specs carry URIs, byte ranges and configurations; results carry names, checksums and manifest
entries. Tensors never travel: workers read their inputs from storage and write their outputs
there themselves: a returned tensor would travel through Ray's object store and Prefect's results.
"""

from __future__ import annotations

from dataclasses import dataclass

from osd_core.allocate import Option
from osd_core.compress import LayerPlan
from osd_core.config import CompressionConfig
from osd_core.manifest import LayerEntry
from osd_io.sources import PairLayout, TensorRef


@dataclass(frozen=True)
class LayerJob:
    """One tensor's fate and where its bytes are (``base`` is None for a tensor new in the fine-tune)."""

    plan: LayerPlan
    finetuned: TensorRef
    base: TensorRef | None

    @property
    def name(self) -> str:
        return self.plan.name


@dataclass(frozen=True)
class LayerGroup:
    """A unit of work: tensors of one shard, compressed by one worker into one payload."""

    index: int
    shard: str
    label: str
    layers: tuple[LayerJob, ...]

    @property
    def largest_bytes(self) -> int:
        return max((4 * layer.finetuned.numel for layer in self.layers), default=0)

    @property
    def payload_name(self) -> str:
        return f"payload-{self.index:05d}.safetensors"


@dataclass(frozen=True)
class GroupJob:
    """Compress (or measure) one layer group of one model under one configuration.

    ``budgets`` gives per-tensor budget bits from a global allocation; empty means the paper's
    uniform per-layer budget. ``allocation`` says which tensors a measuring job measures (all
    factorised ones, and under ``global-all`` the 1-D ones). ``prefix`` is the delta's key prefix
    in the store at ``store``.
    """

    model: str
    variant: str
    group: LayerGroup
    config: CompressionConfig
    store: str
    prefix: str
    budgets: tuple[tuple[str, int], ...] = ()
    device: str = "auto"
    allocation: str = "uniform"

    @property
    def name(self) -> str:
        """Model, layer group and budget: what the Prefect UI and the Ray dashboard show."""
        return f"{self.model} {self.group.label} {self.variant}"


@dataclass(frozen=True)
class GroupResult:
    """What a worker wrote: payload file name, its sha256 and size, and its layers' manifest entries.

    ``node`` is the Ray node that ran it (empty outside Ray): where a cluster's work went.
    """

    payload: str
    sha256: str
    bytes: int
    layers: dict[str, LayerEntry]
    seconds: float
    device: str
    node: str = ""


@dataclass(frozen=True)
class LayerCurve:
    """Damage of one tensor at each measured budget (phase 1 of global allocation)."""

    name: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class CalibrationJob:
    """Compute a model's calibration gradients once and store them at ``key`` for workers to read."""

    model: str
    pair: PairLayout
    calibration: str
    config: CompressionConfig
    store: str
    key: str

    @property
    def name(self) -> str:
        return f"{self.model} calibration"


@dataclass(frozen=True)
class EvalJob:
    """Reconstruct a committed delta on its base and score it on labelled JSONL rows.

    With no ``prefix`` the fine-tune itself is scored: the reference each delta's accuracy is a
    fraction of ("of full" in reports).
    """

    model: str
    variant: str
    pair: PairLayout
    store: str
    prefix: str | None
    manifest_sha256: str | None
    data: str

    @property
    def name(self) -> str:
        return f"{self.model} {self.variant}"


@dataclass(frozen=True)
class EvalRecord:
    """A score as the catalog records it: the metric, its value and direction, and what came beside it."""

    metric: str
    value: float
    higher_is_better: bool
    extra: dict[str, float | int]
    rows: int
    seconds: float
