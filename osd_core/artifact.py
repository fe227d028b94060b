"""The on-disk format of a compressed delta: safetensors payloads plus a JSON manifest.

A delta is a directory (an object-store prefix once uploaded)::

    manifest.json                 format name and version, osd-fleet version, method and
                                  parameters, base and fine-tune identity, every layer's kind,
                                  shape, rank and bits, and the sha256 of every other file
    payload-00000.safetensors     every layer's value and position tensors in one uint8 tensor, their
                                  layout compressed in its header (``osd_core.packed_payload``)
    files/config.json             the fine-tune's configuration (and any small file that differs
                                  from the base's), restored verbatim by reconstruction

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place only
once complete, so a crash leaves no half-written delta under the final name. The manifest holds
no timestamps, so compressing the same inputs twice gives byte-identical files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import packed_payload
from .byte_source import LocalDirectory
from .errors import ArtifactError, OSDError
from .file_hashes import sha256_file
from .layer import CompressedLayer
from .manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PACKED_FROM,
    PAYLOAD_NAME,
    SIDE_FILE_NAME,
    FileEntry,
    LayerEntry,
    Manifest,
    PayloadEntry,
)
from .outputs import OutputDir, check_output, json_field
from .safetensors_io import TensorEntry, read_header, read_tensor

MANIFEST = "manifest.json"
SHARD_BYTES = 1 << 30


@dataclass(frozen=True)
class Payload:
    """One encoded payload file and the manifest entries of the layers inside it.

    Payloads are built independently (one per worker and layer group in the fleet pipeline) and
    tied together by a manifest written last, so a delta is complete exactly when its manifest
    exists.
    """

    name: str
    data: bytes
    layers: dict[str, LayerEntry]

    @property
    def entry(self) -> PayloadEntry:
        return PayloadEntry(self.name, hashlib.sha256(self.data).hexdigest(), len(self.data), self.layers)


def encode_payload(name: str, layers: Sequence[tuple[CompressedLayer, Mapping[str, Any]]]) -> Payload:
    """Encode ``layers`` (each with its role, dtype and rel_error for the manifest) as payload ``name``."""
    if not PAYLOAD_NAME.fullmatch(name):
        raise ArtifactError(f"payload name {name!r} must match {PAYLOAD_NAME.pattern}")
    entries: dict[str, LayerEntry] = {}
    for layer, extra in layers:
        if layer.name in entries:
            raise ArtifactError(f"tensor {layer.name!r} appears twice in payload {name}")
        entries[layer.name] = LayerEntry(
            layer.kind, tuple(layer.shape), layer.k, layer.budget_bits, layer.paper_bits,
            name if layer.tensors else None, bytes=layer.nbytes, new_rows=layer.new_rows or None, **extra,
        )
    stored = [(layer.name, layer.tensors) for layer, _ in layers if layer.tensors]
    return Payload(name, packed_payload.pack(stored, f"{FORMAT_NAME}/{FORMAT_VERSION}"), entries)


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
        """Queue ``layer``'s payload; ``extra`` (role, dtype, rel_error) goes into its manifest entry."""
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
        """Write the manifest (``fields``: :meth:`Manifest.build`'s provenance) and publish the delta."""
        self._flush()
        manifest = Manifest.build([p.entry for p in self._payloads], self._files, **fields)
        if self._files:
            (self._tmp / "files").mkdir()
        for name, data in self._files.items():
            (self._tmp / "files" / name).write_bytes(data)
        (self._tmp / MANIFEST).write_bytes(manifest.to_bytes())
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
    manifest: Manifest
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
        manifest = Manifest.parse(raw, manifest_path)
        for name, info in {**manifest.payloads, **{f"files/{k}": v for k, v in manifest.files.items()}}.items():
            _check_file(path, name, info)
        return cls(path, manifest, hashlib.sha256(raw).hexdigest())

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config

    def side_file(self, name: str) -> bytes:
        if name not in self.manifest.files:
            raise ArtifactError(f"{self.path}: no side file {name!r}")
        return (self.path / "files" / name).read_bytes()

    def layers(self) -> Iterator[CompressedLayer]:
        """Yield every layer, reading each payload's header once and each part with one range read."""
        layouts: dict[str, dict[str, dict[str, TensorEntry]]] = {}
        source = LocalDirectory(self.path)
        for name, info in self.manifest.layers.items():
            tensors = {}
            if info.file is not None:
                if info.file not in layouts:
                    layouts = {info.file: self._layout(source, info.file)}
                parts = layouts[info.file].get(name, {})
                tensors = {part: read_tensor(source, entry) for part, entry in parts.items()}
                if not tensors:
                    raise ArtifactError(f"{self.path / info.file}: payload lacks the tensors of {name!r}")
            try:
                yield CompressedLayer(
                    name, info.kind, info.shape, tensors, k=info.k,
                    budget_bits=info.budget_bits, paper_bits=info.paper_bits, new_rows=info.new_rows or 0,
                )
            except OSDError as exc:
                raise ArtifactError(f"{self.path}: {exc}") from None

    def _layout(self, source: LocalDirectory, file: str) -> dict[str, dict[str, TensorEntry]]:
        """Each layer's part entries in payload ``file``: the packed layout from version 5, before it
        one tensor per part, named ``<tensor>::<part>``."""
        header = read_header(source, file)
        if self.manifest.format_version >= PACKED_FROM:
            return packed_payload.layout(header, self.path / file)
        layers: dict[str, dict[str, TensorEntry]] = {}
        for key, entry in header.tensors.items():
            layer, separator, part = key.partition("::")
            if separator:
                layers.setdefault(layer, {})[part] = entry
        return layers


def check_delta_output(out: str | Path, *, inputs: Sequence[str | Path] = (), overwrite: bool = False) -> None:
    """Raise now, before any work, unless a delta may be written to ``out`` (:mod:`osd_core.outputs`)."""
    check_output(Path(out), what="delta", inputs=inputs, overwrite=overwrite, is_ours=is_delta_dir)


def is_delta_dir(path: Path) -> bool:
    """Whether ``path`` holds an osd-fleet delta's manifest (so ``--overwrite`` may replace it)."""
    return json_field(path / MANIFEST, "format") == FORMAT_NAME


def _check_file(root: Path, name: str, info: FileEntry) -> None:
    path = root / name
    if not path.is_file():
        raise ArtifactError(f"{path}: listed in the manifest but missing")
    if sha256_file(path) != info.sha256:
        raise ArtifactError(f"{path}: checksum mismatch (sha256 differs from the manifest): the file is corrupt")
