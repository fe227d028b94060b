"""A delta's manifest as a typed, versioned record: what it lists, how it is sealed and checked.

The manifest is the commit of a delta: written last, it names every payload and side file with
its checksum, every layer's kind, shape, rank and bits, the configuration, and the identities of
the base and fine-tune. Readers get a :class:`Manifest`, never a dict, and only after every
field has been type-checked and the seal verified, so a malformed manifest is refused whole,
never half-read. Its JSON form is canonical (sorted keys, no timestamps): the same inputs give
byte-identical manifests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, packed_json
from .errors import ArtifactError

FORMAT_NAME = "osd-fleet-delta"
# Version 2 added bitmap positions and int8 values with per-column scales; version 1 deltas
# (indices and float values only) are a subset and stay readable. Version 3 seals the manifest
# with its own digest (``manifest_sha256``), which readers of version 3 require. Version 4 adds
# ``experts`` layers (a mixture-of-experts tensor, slice by slice), ``sign`` layers (BitDelta) and a
# layer's ``new_rows`` (the rows a vocabulary-resized fine-tune appended, stored whole): a version-3
# reader would misread them. Version 5 packs what was most of a small delta's fixed bytes: payloads
# hold one data tensor with a compressed layout (``osd_core.packed_payload``), the manifest holds
# its layer table compressed (``layers_packed``), and ``dense`` layers may be int8 with one scale.
# Version 6 adds factored layers at mixed widths (``q8.``/``q4.``/``q2.`` column groups, int2
# values among them: Delta-CoMe), which a version-5 reader would refuse.
FORMAT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
SEALED_FROM = 3
SEAL = "manifest_sha256"
PACKED_FROM = 5
PACKED_LAYERS = "layers_packed"  # from version 5: the layer table, compressed (osd_core.packed_json)
PAYLOAD_NAME = re.compile(r"payload-[A-Za-z0-9_.-]{1,100}\.safetensors")
SIDE_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class FileEntry:
    """A payload or side file as the manifest lists it: its checksum and size."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class LayerEntry:
    """One tensor of the fine-tune: how it is stored, in which payload, and what it cost.

    ``budget_bits`` is None for tensors stored dense; ``file`` is None when nothing is stored
    (an unchanged or zero delta). ``dtype`` is the fine-tune's, restored on reconstruction.
    """

    kind: str
    shape: tuple[int, ...]
    k: int
    budget_bits: int | None
    paper_bits: int
    file: str | None
    bytes: int | None = None
    dtype: str | None = None
    role: str | None = None
    rel_error: float | None = None
    new_rows: int | None = None  # rows the fine-tune appended (added tokens); ``shape`` includes them

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.default is dataclasses.MISSING or getattr(self, f.name) is not None}


@dataclass(frozen=True)
class Manifest:
    """Everything a delta is, but its payload bytes."""

    config: dict[str, Any]
    base: dict[str, str]
    finetuned: dict[str, str]
    layers: dict[str, LayerEntry]
    payloads: dict[str, FileEntry]
    files: dict[str, FileEntry]
    totals: dict[str, int]
    allocation: str | None = None  # across layers: uniform or global (absent before version 2)
    unknown_tensors: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    osd_fleet_version: str = __version__

    @classmethod
    def build(cls, payloads: Sequence[PayloadEntry], files: Mapping[str, bytes], *, config: dict[str, Any],
              base: dict[str, str], finetuned: dict[str, str], allocation: str,
              unknown_tensors: Sequence[str] = (), provenance: Mapping[str, Any] | None = None) -> Manifest:
        """The manifest that makes ``payloads`` and side ``files`` one delta."""
        layers: dict[str, LayerEntry] = {}
        for payload in payloads:
            clash = set(layers) & set(payload.layers)
            if clash:
                raise ArtifactError(f"tensor {sorted(clash)[0]!r} appears in more than one payload")
            layers.update(payload.layers)
        for name in files:
            if not SIDE_FILE_NAME.fullmatch(name):
                raise ArtifactError(f"side file name {name!r} must be a plain file name")
        compressed = [entry for entry in layers.values() if entry.budget_bits is not None]
        return cls(
            config=dict(config), base=dict(base), finetuned=dict(finetuned), allocation=allocation,
            unknown_tensors=tuple(unknown_tensors), provenance=dict(provenance or {}),
            layers=dict(sorted(layers.items())),
            payloads={p.name: FileEntry(p.sha256, p.bytes) for p in sorted(payloads, key=lambda p: p.name)
                      if p.layers},
            files={name: FileEntry(hashlib.sha256(data).hexdigest(), len(data))
                   for name, data in sorted(files.items())},
            totals={
                "budget_bits": sum(entry.budget_bits or 0 for entry in compressed),
                "paper_bits": sum(entry.paper_bits for entry in compressed),
                "payload_bytes": sum(p.bytes for p in payloads),
            },
        )

    @classmethod
    def parse(cls, raw: bytes, where: str | Path) -> Manifest:
        """Decode, unseal and type-check manifest bytes; raise :class:`ArtifactError` naming ``where``."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ArtifactError(f"{where}: unreadable manifest ({reason})") from None
        manifest = _from_json(unpack_layers(data, where), where)
        if manifest.format_version >= SEALED_FROM or SEAL in data:
            unsealed = {key: value for key, value in data.items() if key != SEAL}
            if data.get(SEAL) != hashlib.sha256(_canonical(unsealed)).hexdigest():
                raise ArtifactError(
                    f"{where}: the manifest was changed after it was written (its {SEAL} does not match its "
                    "content); refusing it rather than decode a different model"
                )
        return manifest

    def to_json(self) -> dict[str, Any]:
        """The manifest's JSON object, unsealed."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "osd_fleet_version": self.osd_fleet_version,
            "config": self.config,
            "base": self.base,
            "finetuned": self.finetuned,
            **({"allocation": self.allocation} if self.allocation is not None else {}),
            "unknown_tensors": list(self.unknown_tensors),
            "provenance": self.provenance,
            "layers": {name: entry.to_json() for name, entry in self.layers.items()},
            "payloads": {name: dataclasses.asdict(entry) for name, entry in self.payloads.items()},
            "files": {name: dataclasses.asdict(entry) for name, entry in self.files.items()},
            "totals": self.totals,
        }

    def to_bytes(self) -> bytes:
        """Canonical, sealed bytes (see :func:`seal`), the layer table packed from version 5."""
        return seal(pack_layers(self.to_json()))


@dataclass(frozen=True)
class PayloadEntry:
    """A payload as the manifest lists it: name, checksum, size and the layers inside it.

    The manifest needs no payload bytes, so a commit in the object store can be built from what
    workers report and the store recorded, without downloading a payload.
    """

    name: str
    sha256: str
    bytes: int
    layers: dict[str, LayerEntry]


def pack_layers(data: dict[str, Any]) -> dict[str, Any]:
    """The manifest's stored form: from version 5 its ``layers`` compressed as ``layers_packed``."""
    if not isinstance(data.get("format_version"), int) or data["format_version"] < PACKED_FROM:
        return data
    stored = {key: value for key, value in data.items() if key != "layers"}
    return {**stored, PACKED_LAYERS: packed_json.encode(data["layers"])}


def unpack_layers(data: Any, where: str | Path) -> Any:
    """The manifest's JSON with ``layers`` as a plain object again (version 5's ``layers_packed``)."""
    if not isinstance(data, dict) or not _natural(data.get("format_version")) \
            or data["format_version"] < PACKED_FROM:
        return data
    if PACKED_LAYERS not in data or "layers" in data:
        raise ArtifactError(f"{where}: a version-{data['format_version']} manifest holds its layer table as "
                            f"{PACKED_LAYERS!r} and not as 'layers'")
    unpacked = {key: value for key, value in data.items() if key != PACKED_LAYERS}
    return {**unpacked, "layers": packed_json.decode(data[PACKED_LAYERS], where, "manifest layer table")}


def seal(data: dict[str, Any]) -> bytes:
    """Canonical manifest bytes (sorted keys) with the digest of everything else as ``manifest_sha256``.

    The seal binds the manifest to itself the way payload checksums bind the payloads to it: a
    hand-edited ``k`` or dtype, with the checksums left as they were, no longer decodes into a
    different model with exit 0; every reader refuses it. It guards against accidents, not
    forgers: whoever recomputes it, or rewrites a sealed manifest as version 2 without it, is
    not stopped.
    """
    unsealed = {key: value for key, value in data.items() if key != SEAL}
    return _canonical({**unsealed, SEAL: hashlib.sha256(_canonical(unsealed)).hexdigest()})


def _canonical(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- reading, every field checked

Check = Callable[[Any], bool]


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


_LAYER_FIELDS: dict[str, tuple[str, Check]] = {
    # field: (what it must be, check); the first six are required
    "kind": ("a string", lambda v: isinstance(v, str)),
    "shape": ("a list of integers >= 0", lambda v: isinstance(v, list) and all(_natural(s) for s in v)),
    "k": ("an integer >= 0", _natural),
    "budget_bits": ("an integer >= 0 or null", lambda v: v is None or _natural(v)),
    "paper_bits": ("an integer >= 0", _natural),
    "file": ("a payload name or null", lambda v: v is None or isinstance(v, str)),
    "bytes": ("an integer >= 0", _natural),
    "dtype": ("a string", lambda v: isinstance(v, str)),
    "role": ("a string", lambda v: isinstance(v, str)),
    "rel_error": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "new_rows": ("an integer >= 1", lambda v: _natural(v) and v >= 1),
}
_REQUIRED_LAYER_FIELDS = ("kind", "shape", "k", "budget_bits", "paper_bits", "file")
_TOP_LEVEL = {"format", "format_version", "osd_fleet_version", *(f.name for f in dataclasses.fields(Manifest)), SEAL}


def _from_json(data: Any, where: str | Path) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{where}: not an osd-fleet delta manifest (format must be {FORMAT_NAME!r})")
    version = data.get("format_version")
    if not _natural(version) or version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{where}: format version {version!r} is not supported; this osd-fleet {__version__} reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown and version >= SEALED_FROM:  # older writers' extra fields are ignored
        raise ArtifactError(f"{where}: unknown manifest field {unknown[0]!r}")
    for key in ("layers", "payloads", "files", "config", "base", "finetuned"):
        if not isinstance(data.get(key), dict):
            raise ArtifactError(f"{where}: manifest field {key!r} is missing or not an object")
    totals = data.get("totals", {})
    if not isinstance(totals, dict) or not all(_natural(v) for v in totals.values()):
        raise ArtifactError(f"{where}: manifest field 'totals' must map names to integers >= 0")
    for key in ("base", "finetuned"):
        if not all(isinstance(v, str) for v in data[key].values()):
            raise ArtifactError(f"{where}: manifest field {key!r} must map names to strings")
        if "sha256" in data[key] and not _is_sha256(data[key]["sha256"]):
            raise ArtifactError(f"{where}: manifest field {key}.sha256 must be 64 hex digits")
    for key, what, valid in (("allocation", "a string", lambda v: isinstance(v, str)),
                             ("unknown_tensors", "a list of strings", _strings),
                             ("provenance", "an object", lambda v: isinstance(v, dict)),
                             ("osd_fleet_version", "a string", lambda v: isinstance(v, str))):
        if key in data and not valid(data[key]):
            raise ArtifactError(f"{where}: manifest field {key!r} must be {what}")
    listed = {section: _file_entries(data[section], section, pattern, where)
              for section, pattern in (("payloads", PAYLOAD_NAME), ("files", SIDE_FILE_NAME))}
    layers = {name: _layer_entry(name, info, listed["payloads"], version, where)
              for name, info in data["layers"].items()}
    return Manifest(
        config=data["config"], base=data["base"], finetuned=data["finetuned"], layers=layers,
        payloads=listed["payloads"], files=listed["files"], totals=totals, allocation=data.get("allocation"),
        unknown_tensors=tuple(data.get("unknown_tensors", ())), provenance=data.get("provenance", {}),
        format_version=version, osd_fleet_version=data.get("osd_fleet_version", "unknown"),
    )


def _file_entries(section: dict[str, Any], what: str, pattern: re.Pattern[str], where: str | Path
                  ) -> dict[str, FileEntry]:
    entries = {}
    for name, info in section.items():
        if not pattern.fullmatch(name):
            raise ArtifactError(
                f"{where}: {what} entry {name!r} is not a plain file name (must match {pattern.pattern})")
        if not isinstance(info, dict) or not _is_sha256(info.get("sha256")) or not _natural(info.get("bytes")):
            raise ArtifactError(f"{where}: {what} entry {name!r} needs sha256 (64 hex digits) and bytes (int)")
        entries[name] = FileEntry(info["sha256"], info["bytes"])
    return entries


def _layer_entry(name: str, info: Any, payloads: dict[str, FileEntry], version: int, where: str | Path
                 ) -> LayerEntry:
    if not isinstance(info, dict) or any(f not in info for f in _REQUIRED_LAYER_FIELDS):
        raise ArtifactError(f"{where}: layer {name!r} lacks one of {_REQUIRED_LAYER_FIELDS}")
    unknown = sorted(set(info) - set(_LAYER_FIELDS))
    if unknown and version >= SEALED_FROM:
        raise ArtifactError(f"{where}: layer {name!r} has unknown field {unknown[0]!r}")
    for key, (what, valid) in _LAYER_FIELDS.items():
        if key in info and not valid(info[key]):
            raise ArtifactError(f"{where}: layer {name!r} field {key!r} must be {what}, got {info[key]!r}")
    if info["file"] is not None and info["file"] not in payloads:
        raise ArtifactError(f"{where}: layer {name!r} refers to unknown payload {info['file']!r}")
    known = {key: value for key, value in info.items() if key in _LAYER_FIELDS}
    return LayerEntry(**{**known, "shape": tuple(info["shape"])})
