"""The on-disk format of a compressed delta: safetensors payloads plus a JSON manifest.

A delta is a directory (an object-store prefix once uploaded)::

    manifest.json                 format name and version, osd-fleet version, method and
                                  parameters, base and fine-tune identity, every layer's kind,
                                  shape, rank and bits, and the sha256 of every other file
    payload-00000.safetensors     value and position tensors, named "<tensor>::<part>"
    files/config.json             the fine-tune's configuration (and any small file that differs
                                  from the base's), restored verbatim by reconstruction

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place only
once complete, so a crash leaves no half-written delta under the final name. The manifest holds
no timestamps, so compressing the same inputs twice gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from . import __version__
from .errors import ArtifactError, OSDError
from .layer import CompressedLayer
from .outputs import OutputDir, check_output, json_field
from .byte_source import LocalDirectory, sha256_file
from .safetensors_io import read_header, read_tensor

FORMAT_NAME = "osd-fleet-delta"
# Version 2 added bitmap positions and int8 values with per-column scales; version 1 deltas
# (indices and float values only) are a subset and stay readable. Version 3 seals the manifest
# with its own digest (``manifest_sha256``), which readers of version 3 require.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SEALED_FROM = 3
MANIFEST = "manifest.json"
SEAL = "manifest_sha256"
SHARD_BYTES = 1 << 30
PAYLOAD_NAME = re.compile(r"payload-[A-Za-z0-9_.-]{1,100}\.safetensors")
SIDE_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class Payload:
    """One encoded payload file and the manifest entries of the layers inside it.

    Payloads are built independently (one per worker and layer group in the fleet pipeline) and
    tied together by a manifest written last, so a delta is complete exactly when its manifest
    exists.
    """

    name: str
    data: bytes
    layers: dict[str, dict[str, Any]]

    @property
    def entry(self) -> PayloadEntry:
        return PayloadEntry(self.name, hashlib.sha256(self.data).hexdigest(), len(self.data), self.layers)


@dataclass(frozen=True)
class PayloadEntry:
    """A payload as the manifest lists it: name, checksum, size and the layers inside it.

    The manifest needs no payload bytes, so a commit in the object store can be built from what
    workers report and the store recorded, without downloading a payload.
    """

    name: str
    sha256: str
    bytes: int
    layers: dict[str, dict[str, Any]]


def encode_payload(name: str, layers: Sequence[tuple[CompressedLayer, dict[str, Any]]]) -> Payload:
    """Encode ``layers`` (each with extra manifest fields: role, dtype, error...) as payload ``name``."""
    if not PAYLOAD_NAME.fullmatch(name):
        raise ArtifactError(f"payload name {name!r} must match {PAYLOAD_NAME.pattern}")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for layer, extra in layers:
        if "::" in layer.name:
            raise ArtifactError(f"tensor name {layer.name!r} must not contain '::'")
        if layer.name in entries:
            raise ArtifactError(f"tensor {layer.name!r} appears twice in payload {name}")
        for part, tensor in layer.tensors.items():
            tensors[f"{layer.name}::{part}"] = tensor.detach().cpu().contiguous().clone()
        entries[layer.name] = {
            "kind": layer.kind, "shape": list(layer.shape), "k": layer.k, "budget_bits": layer.budget_bits,
            "paper_bits": layer.paper_bits, "bytes": layer.nbytes, "file": name if layer.tensors else None, **extra,
        }
    # One metadata key only: safetensors writes metadata in hash-map order, and the bytes must not vary.
    return Payload(name, save(tensors, metadata={"format": f"{FORMAT_NAME}/{FORMAT_VERSION}"}), entries)


def build_manifest(payloads: Sequence[PayloadEntry], files: dict[str, bytes], **fields: Any) -> dict[str, Any]:
    """The manifest that makes ``payloads`` and side ``files`` one delta; ``fields`` add provenance."""
    layers: dict[str, dict[str, Any]] = {}
    for payload in payloads:
        clash = set(layers) & set(payload.layers)
        if clash:
            raise ArtifactError(f"tensor {sorted(clash)[0]!r} appears in more than one payload")
        layers.update(payload.layers)
    compressed = [v for v in layers.values() if v["budget_bits"] is not None]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "osd_fleet_version": __version__,
        **fields,
        "layers": dict(sorted(layers.items())),
        "payloads": {p.name: {"sha256": p.sha256, "bytes": p.bytes} for p in sorted(payloads, key=lambda p: p.name)
                     if p.layers},
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in sorted(files.items())
        },
        "totals": {
            "budget_bits": sum(v["budget_bits"] for v in compressed),
            "paper_bits": sum(v["paper_bits"] for v in compressed),
            "payload_bytes": sum(p.bytes for p in payloads),
        },
    }


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Canonical, sealed manifest bytes: sorted keys, plus the digest of everything else.

    The seal binds the manifest to itself the way payload checksums bind the payloads to it: a
    hand-edited ``k`` or dtype, with the checksums left as they were, no longer decodes into a
    different model with exit 0; every reader refuses it.
    """
    unsealed = {key: value for key, value in manifest.items() if key != SEAL}
    return _canonical({**unsealed, SEAL: hashlib.sha256(_canonical(unsealed)).hexdigest()})


def parse_manifest(raw: bytes, where: str | Path) -> dict[str, Any]:
    """Decode, unseal and type-check manifest bytes; raise :class:`ArtifactError` naming ``where``."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ArtifactError(f"{where}: unreadable manifest ({reason})") from None
    _check_manifest(manifest, where)
    if manifest["format_version"] >= SEALED_FROM or SEAL in manifest:
        unsealed = {key: value for key, value in manifest.items() if key != SEAL}
        if manifest.get(SEAL) != hashlib.sha256(_canonical(unsealed)).hexdigest():
            raise ArtifactError(
                f"{where}: the manifest was changed after it was written (its {SEAL} does not match its "
                "content); refusing it rather than decode a different model"
            )
    return manifest


def _canonical(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


class DeltaWriter:
    """Collects compressed layers and publishes them as one local delta directory, atomically.

    The output follows :mod:`osd_core.outputs`: never one of ``inputs``, replaced only with
    ``overwrite`` when it is itself a delta, and of two writers of one directory exactly one wins.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        overwrite: bool = False,
        inputs: Sequence[str | Path] = (),
        shard_bytes: int = SHARD_BYTES,
    ):
        self.out_dir = Path(out_dir)
        self._output = OutputDir(self.out_dir, what="delta", inputs=inputs, overwrite=overwrite, is_ours=is_delta_dir)
        self._shard_bytes = shard_bytes
        self._tmp = self._output.tmp
        self._pending: list[tuple[CompressedLayer, dict[str, Any]]] = []
        self._pending_bytes = 0
        self._payloads: list[Payload] = []
        self._files: dict[str, bytes] = {}

    def __enter__(self) -> DeltaWriter:
        self._output.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._output.__exit__(*exc_info)

    def add(self, layer: CompressedLayer, **extra: Any) -> None:
        """Queue ``layer``'s payload; ``extra`` (role, dtype, error...) goes into its manifest entry."""
        self._pending.append((layer, extra))
        self._pending_bytes += layer.nbytes
        if self._pending_bytes >= self._shard_bytes:
            self._flush()

    def add_file(self, name: str, data: bytes) -> None:
        """Store a small side file (configuration) verbatim under ``files/``."""
        if not SIDE_FILE_NAME.fullmatch(name):
            raise ArtifactError(f"side file name {name!r} must be a plain file name")
        self._files[name] = data

    def commit(self, **fields: Any) -> Path:
        """Write the manifest and move the finished delta to its final name."""
        self._flush()
        manifest = build_manifest([p.entry for p in self._payloads], self._files, **fields)
        if self._files:
            (self._tmp / "files").mkdir()
        for name, data in self._files.items():
            (self._tmp / "files" / name).write_bytes(data)
        (self._tmp / MANIFEST).write_bytes(manifest_bytes(manifest))
        return self._output.publish()

    def _flush(self) -> None:
        if not self._pending:
            return
        payload = encode_payload(f"payload-{len(self._payloads):05d}.safetensors", self._pending)
        (self._tmp / payload.name).write_bytes(payload.data)
        self._payloads.append(payload)
        self._pending, self._pending_bytes = [], 0


@dataclass(frozen=True)
class DeltaArtifact:
    """A verified delta directory: manifest checked, every payload's checksum matched."""

    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @classmethod
    def open(cls, path: str | Path, *, expected_sha256: str | None = None) -> DeltaArtifact:
        """Open and verify a delta; ``expected_sha256`` (from a catalog row) pins the manifest too."""
        path = Path(path)
        manifest_path = path / MANIFEST
        try:
            raw = manifest_path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: not an osd-fleet delta ({MANIFEST} is missing)") from None
        except OSError as exc:
            raise ArtifactError(f"{manifest_path}: unreadable manifest ({exc.strerror})") from None
        if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
            raise ArtifactError(f"{manifest_path}: checksum mismatch (sha256 differs from the catalog's)")
        manifest = parse_manifest(raw, manifest_path)
        for name, info in {**manifest["payloads"], **{f"files/{k}": v for k, v in manifest["files"].items()}}.items():
            _check_file(path, name, info)
        return cls(path, manifest, hashlib.sha256(raw).hexdigest())

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["config"]

    def side_file(self, name: str) -> bytes:
        if name not in self.manifest["files"]:
            raise ArtifactError(f"{self.path}: no side file {name!r}")
        return (self.path / "files" / name).read_bytes()

    def layers(self) -> Iterator[CompressedLayer]:
        """Yield every layer, reading each payload file once."""
        headers = {}
        source = LocalDirectory(self.path)
        for name, info in self.manifest["layers"].items():
            tensors = {}
            if info["file"] is not None:
                if info["file"] not in headers:
                    headers = {info["file"]: read_header(source, info["file"])}
                entries = headers[info["file"]].tensors
                tensors = {key.partition("::")[2]: read_tensor(source, entry) for key, entry in entries.items()
                           if key.partition("::")[0] == name and "::" in key}
                if not tensors:
                    raise ArtifactError(f"{self.path / info['file']}: payload lacks the tensors of {name!r}")
            try:
                yield CompressedLayer(
                    name, info["kind"], tuple(info["shape"]), tensors, k=info["k"],
                    budget_bits=info["budget_bits"], paper_bits=info["paper_bits"],
                )
            except OSDError as exc:
                raise ArtifactError(f"{self.path}: {exc}") from None


def check_delta_output(out: str | Path, *, inputs: Sequence[str | Path] = (), overwrite: bool = False) -> None:
    """Raise now, before any work, unless a delta may be written to ``out`` (:mod:`osd_core.outputs`)."""
    check_output(Path(out), what="delta", inputs=inputs, overwrite=overwrite, is_ours=is_delta_dir)


def is_delta_dir(path: Path) -> bool:
    """Whether ``path`` holds an osd-fleet delta's manifest (so ``--overwrite`` may replace it)."""
    return json_field(path / MANIFEST, "format") == FORMAT_NAME


def _check_manifest(manifest: Any, where: str | Path) -> None:
    """Type-check every field a reader uses, so a malformed manifest is refused, never half-read."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{where}: not an osd-fleet delta manifest (format must be {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if not _natural(version) or version not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{where}: format version {version!r} is not supported; this osd-fleet {__version__} reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    for key in ("layers", "payloads", "files", "config", "base", "finetuned"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{where}: manifest field {key!r} is missing or not an object")
    totals = manifest.get("totals", {})
    if not isinstance(totals, dict) or not all(_natural(v) for v in totals.values()):
        raise ArtifactError(f"{where}: manifest field 'totals' must map names to integers >= 0")
    for key in ("base", "finetuned"):
        if "sha256" in manifest[key] and not _is_sha256(manifest[key]["sha256"]):
            raise ArtifactError(f"{where}: manifest field {key}.sha256 must be 64 hex digits")
    for section, pattern in (("payloads", PAYLOAD_NAME), ("files", SIDE_FILE_NAME)):
        for name, info in manifest[section].items():
            if not pattern.fullmatch(name):
                raise ArtifactError(f"{where}: {section} entry {name!r} is not a plain file name "
                                    f"(must match {pattern.pattern})")
            if not isinstance(info, dict) or not _is_sha256(info.get("sha256")) or not _natural(info.get("bytes")):
                raise ArtifactError(f"{where}: {section} entry {name!r} needs sha256 (64 hex digits) and bytes (int)")
    for name, info in manifest["layers"].items():
        _check_layer_entry(name, info, manifest["payloads"], where)


_LAYER_FIELDS: dict[str, tuple[str, Any]] = {
    # field: (what it must be, check); the first six are required
    "kind": ("a string", lambda v: isinstance(v, str)),
    "shape": ("a list of integers >= 0", lambda v: isinstance(v, list) and all(_natural(s) for s in v)),
    "k": ("an integer >= 0", lambda v: _natural(v)),
    "budget_bits": ("an integer >= 0 or null", lambda v: v is None or _natural(v)),
    "paper_bits": ("an integer >= 0", lambda v: _natural(v)),
    "file": ("a payload name or null", lambda v: v is None or isinstance(v, str)),
    "bytes": ("an integer >= 0", lambda v: _natural(v)),
    "dtype": ("a string", lambda v: isinstance(v, str)),
    "role": ("a string", lambda v: isinstance(v, str)),
    "rel_error": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
}
_REQUIRED_LAYER_FIELDS = ("kind", "shape", "k", "budget_bits", "paper_bits", "file")


def _check_layer_entry(name: str, info: Any, payloads: dict[str, Any], where: str | Path) -> None:
    if not isinstance(info, dict) or any(field not in info for field in _REQUIRED_LAYER_FIELDS):
        raise ArtifactError(f"{where}: layer {name!r} lacks one of {_REQUIRED_LAYER_FIELDS}")
    for field, (what, valid) in _LAYER_FIELDS.items():
        if field in info and not valid(info[field]):
            raise ArtifactError(f"{where}: layer {name!r} field {field!r} must be {what}, got {info[field]!r}")
    if info["file"] is not None and info["file"] not in payloads:
        raise ArtifactError(f"{where}: layer {name!r} refers to unknown payload {info['file']!r}")


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _check_file(root: Path, name: str, info: dict[str, Any]) -> None:
    path = root / name
    if not path.is_file():
        raise ArtifactError(f"{path}: listed in the manifest but missing")
    if sha256_file(path) != info["sha256"]:
        raise ArtifactError(f"{path}: checksum mismatch (sha256 differs from the manifest): the file is corrupt")
