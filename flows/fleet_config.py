"""What the fleet pipeline runs: models (where their inputs are) and the sweep applied to each.

Declared once, as dataclasses whose fields carry their help (``osd_core.settings``): the
command-line flags, the fleet file's tables and the flows' parameters all take these names, and
are validated at construction, so a typo fails before a server starts or a tensor is read. A
fleet file is TOML or JSON::

    store = "s3://bucket/fleet"            # or a local directory

    [sweep]
    ranks = [0.5, 1, 2]                    # budget ranks r: 32·r·(n+d) bits per layer (fractions:
                                           # relaxed methods only)
    methods = ["osd", "truncsvd"]
    allocations = ["uniform", "global"]
    group_mib = 512                        # layer-group size (float32 working set; default 512,
                                           # 4096 where tasks take a GPU)
    [sweep.compression]                    # any other CompressionConfig field
    extra_rank = 2
    factor_split = "joint"                 # within a layer (osd); allocations are across layers

    [[models]]
    name = "sentiment-v3"
    base = "s3://bucket/models/base"
    finetuned = "s3://bucket/models/sentiment-v3"
    calibration = "s3://bucket/data/calib.jsonl"   # needed by osd
    eval = "s3://bucket/data/eval.jsonl"           # accuracy goes into the catalog

Relative local paths are resolved against the file's directory.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from osd_core.config import ALLOCATIONS, METHODS, CompressionConfig
from osd_core.errors import ConfigError
from osd_core.settings import REQUIRED, from_table, setting
from osd_io.keys import safe_name
from osd_io.uris import is_s3

# float32 bytes of one layer group, one Ray task (flows.plan). Prefect on Ray costs about 0.15-0.25 s
# a task (bench/pipeline.py), so a task should compute for a few seconds: on one CPU a 512 MiB group
# of a 7B-shaped model takes 2.5-6 s. A GPU does that work in a fraction of a second (its SVDs take
# milliseconds: bench/results/svd-speed-h100-cuda.txt), so tasks that take a GPU get 8x the work,
# about five decoder layers of a 7B model. That size is inferred, not yet measured on a GPU.
DEFAULT_GROUP_BYTES = 512 << 20
GPU_GROUP_BYTES = 4 << 30

URI_FIELDS = ("base", "finetuned", "calibration", "eval")


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned model: its name in the catalog and the URIs of its inputs."""

    name: str = setting(REQUIRED, "the model's name in the catalog")
    base: str = setting(REQUIRED, "base checkpoint: directory or s3://bucket/prefix")
    finetuned: str = setting(REQUIRED, "fine-tuned checkpoint: directory or s3://bucket/prefix")
    calibration: str | None = setting(None, "JSONL rows {text, label}, path or s3:// (needed by osd)")
    eval: str | None = setting(None, "JSONL rows {text, label} to score each delta on, path or s3://")
    revision: str | None = setting(None, "revision recorded in the catalog (default: start of the fine-tune's hash)")

    def __post_init__(self) -> None:
        try:
            safe_name(self.name)
            if self.revision is not None:
                safe_name(self.revision)
        except ValueError as exc:
            raise ConfigError(f"model {self.name!r}: {exc}") from None
        for what in ("base", "finetuned"):
            if not isinstance(getattr(self, what), str) or not getattr(self, what):
                raise ConfigError(f"model {self.name!r}: {what} must be a non-empty URI")
        for what in ("calibration", "eval", "revision"):
            if getattr(self, what) is not None and not isinstance(getattr(self, what), str):
                raise ConfigError(f"model {self.name!r}: {what} must be a string")


@dataclass(frozen=True)
class Variant:
    """One point of a sweep: a full compression configuration and a budget allocation."""

    config: CompressionConfig
    allocation: str

    @property
    def label(self) -> str:
        extra = f"+{self.config.c}" if self.config.method != "truncsvd" else ""
        return f"{self.config.method} r={self.config.rank}{extra} {self.allocation}"


@dataclass(frozen=True)
class SweepSpec:
    """Budgets (ranks) × methods × allocations, on top of one template configuration."""

    ranks: tuple[int | float, ...] = setting(
        (1, 2, 4), "budget ranks r: 32·r·(n+d) bits per layer (fractions such as 0.5 for the relaxed methods)")
    methods: tuple[str, ...] = setting(("magtruncsvd", "osd", "truncsvd"), f"of {', '.join(METHODS)}")
    allocations: tuple[str, ...] = setting(
        ("uniform",), "across layers: uniform (the paper's 32·r·(n+d) each), global (the same total, spent "
        "where it cuts the most error) or global-all (that total spent on the 1-D deltas too)")
    compression: CompressionConfig = setting(
        CompressionConfig, "every other compression setting, shared by all variants", factory=True)
    group_mib: float | None = setting(
        None, f"layer-group size, float32 MiB per task (default: {DEFAULT_GROUP_BYTES >> 20}, or "
        f"{GPU_GROUP_BYTES >> 20} where tasks take a GPU)")

    def __post_init__(self) -> None:
        for name, values, allowed in (
            ("methods", self.methods, METHODS),
            ("allocations", self.allocations, ALLOCATIONS),
        ):
            if not values:
                raise ConfigError(f"sweep {name} must not be empty")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ConfigError(f"sweep {name} must be among {', '.join(allowed)}; got {bad[0]!r}")
        if not self.ranks or any(not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r < math.inf
                                 for r in self.ranks):
            raise ConfigError(f"sweep ranks must be numbers > 0 (fractions for the relaxed methods), "
                              f"got {list(self.ranks)}")
        if self.group_mib is not None and (isinstance(self.group_mib, bool) or not isinstance(
                self.group_mib, (int, float)) or not 0 < self.group_mib < math.inf):
            raise ConfigError(f"group_mib must be a positive number, got {self.group_mib!r}")
        if not self.variants():  # every combination must make a valid configuration, and one must exist
            raise ConfigError(f"sweep has nothing to run: truncsvd needs whole ranks, got {list(self.ranks)}")

    def group_bytes(self, gpu: bool = False) -> int:
        """Float32 bytes of one layer group: ``group_mib``, else the default for tasks that take a GPU or not."""
        if self.group_mib is None:
            return GPU_GROUP_BYTES if gpu else DEFAULT_GROUP_BYTES
        return max(1, int(self.group_mib * (1 << 20)))

    @property
    def needs_calibration(self) -> bool:
        return any(v.config.needs_gradients for v in self.variants())

    def variants(self) -> tuple[Variant, ...]:
        """Every combination, in a stable order (methods, then ranks, then allocations).

        ``truncsvd`` keeps whole singular vectors, so it runs at the sweep's whole ranks only: a
        sweep ``ranks = [0.5, 1]`` over ``magtruncsvd`` and ``truncsvd`` compares them at r = 1.
        """
        out = []
        for method in dict.fromkeys(self.methods):
            for rank in dict.fromkeys(self.ranks):
                if method == "truncsvd" and not float(rank).is_integer():
                    continue
                config = replace(
                    self.compression,
                    method=method,
                    rank=rank,
                    # truncsvd factors at k = r: c is meaningless there, so it must not change identities
                    extra_rank=0 if method == "truncsvd" else self.compression.extra_rank,
                    factor_split=self.compression.factor_split if method == "osd" else "equal",
                )
                out.extend(Variant(config, allocation) for allocation in dict.fromkeys(self.allocations))
        return tuple(out)


SCAN_SWEEP = SweepSpec(ranks=(1, 2), methods=("magtruncsvd", "truncsvd"))
"""What scans and triggered runs compress by default: no osd, which needs a calibration file."""


@dataclass(frozen=True)
class FleetConfig:
    """The models of a fleet, where their artifacts and catalog go, and the sweep."""

    store: str = setting(REQUIRED, "artifact store and catalog: directory or s3://bucket/prefix")
    models: tuple[ModelSpec, ...] = setting(REQUIRED, "the fine-tuned models, each a [[models]] table")
    sweep: SweepSpec = setting(SweepSpec, "the variants compressed for every model", factory=True)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("a fleet needs at least one model")
        names = [m.name for m in self.models]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ConfigError(f"model {duplicate!r} appears more than once in the fleet")
        check_calibration(self.models, self.sweep)

    @property
    def label(self) -> str:
        return f"{len(self.models)} model(s) → {self.store}"


def check_calibration(models: tuple[ModelSpec, ...], sweep: SweepSpec) -> None:
    """Every model a sweep with ``osd`` runs on must have a calibration file."""
    for model in models:
        require_calibration(sweep, model.calibration, f"model {model.name!r}")


def require_calibration(sweep: SweepSpec, calibration: str | None, who: str) -> None:
    """The one check (and message) that a sweep with ``osd`` has calibration rows for ``who``."""
    if sweep.needs_calibration and calibration is None:
        raise ConfigError(f"{who}: method 'osd' needs a calibration file (JSONL rows with text and label)")


def load_fleet_config(path: str | Path) -> FleetConfig:
    """Read a fleet file (``.toml`` or ``.json``), naming the file and field of any error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: fleet file does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the fleet file ({exc})") from None
    try:
        return _fleet(data, path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _fleet(data: Any, root: Path) -> FleetConfig:
    """The fleet file's tables, relative local paths resolved against its directory."""

    def resolve(uri: Any) -> Any:
        if not isinstance(uri, str) or is_s3(uri) or "://" in uri:
            return uri
        return str(root / Path(uri).expanduser())

    if not isinstance(data, dict):
        raise ConfigError("the fleet file must be a table/object")
    data = dict(data)
    if "store" in data:
        data["store"] = resolve(data["store"])
    if isinstance(data.get("models"), list):
        data["models"] = [
            {k: resolve(v) if k in URI_FIELDS else v for k, v in m.items()} if isinstance(m, dict) else m
            for m in data["models"]
        ]
    return from_table(FleetConfig, data)


def sweep_from_dict(data: Any) -> SweepSpec:
    """A sweep from a mapping shaped like a fleet file's ``[sweep]`` table (deployment parameters, JSON)."""
    return from_table(SweepSpec, data, "sweep")
