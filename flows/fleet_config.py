"""What the fleet pipeline runs: models (where their inputs are) and the sweep applied to each.

Validated once at construction so a typo fails before a server starts or a tensor is read. A
fleet file is TOML or JSON::

    store = "s3://bucket/fleet"            # or a local directory

    [sweep]
    ranks = [0.5, 1, 2]                    # budget ranks r: 32·r·(n+d) bits per layer (fractions:
                                           # relaxed methods only)
    methods = ["osd", "truncsvd"]
    allocations = ["uniform", "global"]
    group_mib = 32                         # layer-group size (float32 working set)
    [sweep.compression]                    # any other CompressionConfig field
    extra_rank = 2

    [[models]]
    name = "sentiment-v3"
    base = "s3://bucket/models/base"
    finetuned = "s3://bucket/models/sentiment-v3"
    calibration = "s3://bucket/data/calib.jsonl"   # needed by osd
    eval = "s3://bucket/data/eval.jsonl"           # accuracy goes into the catalog

Relative local paths are resolved against the file's directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from flows.plan import DEFAULT_GROUP_BYTES
from osd_core.allocate import ALLOCATIONS
from osd_core.config import METHODS, CompressionConfig
from osd_core.errors import ConfigError
from osd_io.keys import safe_name
from osd_io.sources import is_s3

T = TypeVar("T")


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned model: its name in the catalog and the URIs of its inputs."""

    name: str
    base: str
    finetuned: str
    calibration: str | None = None
    eval: str | None = None
    revision: str | None = None  # default: the start of the fine-tune's content hash

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

    ranks: tuple[int | float, ...] = (1, 2, 4)
    methods: tuple[str, ...] = ("magtruncsvd", "osd", "truncsvd")
    allocations: tuple[str, ...] = ("uniform",)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    group_bytes: int = DEFAULT_GROUP_BYTES

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
        if self.group_bytes < 1:
            raise ConfigError(f"group size must be positive, got {self.group_bytes} bytes")
        if not self.variants():  # every combination must make a valid configuration, and one must exist
            raise ConfigError(f"sweep has nothing to run: truncsvd needs whole ranks, got {list(self.ranks)}")

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
                    allocation=self.compression.allocation if method == "osd" else "equal",
                )
                out.extend(Variant(config, allocation) for allocation in dict.fromkeys(self.allocations))
        return tuple(out)


@dataclass(frozen=True)
class FleetConfig:
    """The models of a fleet, where their artifacts and catalog go, and the sweep."""

    store: str
    models: tuple[ModelSpec, ...]
    sweep: SweepSpec = field(default_factory=SweepSpec)

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
    if sweep.needs_calibration:
        lacking = [m.name for m in models if m.calibration is None]
        if lacking:
            raise ConfigError(
                f"model {lacking[0]!r}: method 'osd' needs a calibration file (JSONL rows with text and label)"
            )


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
    data = _table(data, "the fleet file", {"store", "models", "sweep"})

    def resolve(uri: str) -> str:
        return uri if is_s3(uri) or "://" in uri else str(root / Path(uri).expanduser())

    if not isinstance(data.get("store"), str):
        raise ConfigError("'store' must be a URI string")
    raw_models = data.get("models")
    if not isinstance(raw_models, list):
        raise ConfigError("'models' must be a list of tables")
    models = []
    for number, raw in enumerate(raw_models, start=1):
        fields = _table(raw, f"models[{number}]", {f.name for f in dataclasses.fields(ModelSpec)})
        if not all(isinstance(v, str) for v in fields.values()):
            raise ConfigError(f"models[{number}]: every field must be a string")
        for key in ("base", "finetuned", "calibration", "eval"):
            if key in fields:
                fields[key] = resolve(fields[key])
        try:
            models.append(ModelSpec(**fields))
        except TypeError as exc:
            raise ConfigError(f"models[{number}]: {exc}") from None
    return FleetConfig(resolve(data["store"]), tuple(models), _sweep(data.get("sweep", {})))


def _sweep(data: Any) -> SweepSpec:
    data = _table(data, "sweep", {"ranks", "methods", "allocations", "group_mib", "compression"})
    kwargs: dict[str, Any] = {}
    for key, kind in (("ranks", (int, float)), ("methods", str), ("allocations", str)):
        if key in data:
            kwargs[key] = _list(data[key], kind, f"sweep.{key}")
    if "group_mib" in data:
        if not isinstance(data["group_mib"], (int, float)) or data["group_mib"] <= 0:
            raise ConfigError(f"sweep.group_mib must be a positive number, got {data['group_mib']!r}")
        kwargs["group_bytes"] = int(data["group_mib"] * (1 << 20))
    if "compression" in data:
        kwargs["compression"] = CompressionConfig.from_dict(_table(data["compression"], "sweep.compression", None))
    return SweepSpec(**kwargs)


def sweep_from_dict(data: Any) -> SweepSpec:
    """A sweep from a mapping shaped like a fleet file's ``[sweep]`` table (deployment parameters, JSON)."""
    return _sweep(data)


def _table(data: Any, where: str, allowed: set[str] | None) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table/object")
    unknown = sorted(set(data) - allowed) if allowed is not None else []
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; expected {', '.join(sorted(allowed or ()))}")
    return dict(data)


def _list(value: Any, kind: type | tuple[type, ...], where: str) -> tuple[Any, ...]:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConfigError(f"{where} must be a list of {names}, got {value!r}")
    return tuple(value)


def parse_rank(text: str) -> int | float:
    """A budget rank as typed: ``2`` stays an integer, ``0.5`` is a fraction."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None


def parse_csv(text: str, convert: Callable[[str], T], what: str) -> tuple[T, ...]:
    """``"1,2,4"`` → ``(1, 2, 4)`` for command-line lists, naming ``what`` on a bad item."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"{what} must list at least one value")
    try:
        return tuple(convert(item) for item in items)
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list, got {text!r}") from None
