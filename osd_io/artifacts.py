"""Deltas in the object store: payloads staged by workers, the manifest as commit marker, downloads.

Layout of one delta (the same files as a local delta directory)::

    artifacts/<model>/<delta id>/payload-00000.safetensors   one per layer group, PUT by its worker
                                 files/config.json           side files
                                 manifest.json               written LAST: the commit marker

Commit protocol: workers PUT their payloads and return small records (name, sha256, manifest
entries). The flow checks each payload's recorded sha256 (a HEAD, not a download) against the
worker's record, writes the side files and then the manifest. A delta exists exactly when its manifest does; the catalog
row is appended only after that, so no row points at a missing object. A crash leaves at most
payloads without a manifest under a prefix: readers ignore them (they read only what a manifest
lists), and a rerun, which has the same delta id and so the same prefix, overwrites them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from osd_core.artifact import MANIFEST
from osd_core.errors import ArtifactError
from osd_core.manifest import LayerEntry, Manifest, PayloadEntry
from osd_io.keys import check_key
from osd_io.storage import ObjectStore


class StagedPayload(Protocol):
    """What a worker reports of a payload it wrote: its name, sha256 and manifest entries."""

    payload: str
    sha256: str
    layers: dict[str, LayerEntry]


@dataclass(frozen=True)
class CommittedDelta:
    """A delta whose manifest is in the store: where, its identity and its size on storage."""

    prefix: str
    uri: str
    manifest_sha256: str
    bytes: int
    budget_bits: int
    paper_bits: int


def commit_delta(
    store: ObjectStore, prefix: str, results: Sequence[StagedPayload], files: dict[str, bytes], **fields: Any
) -> CommittedDelta:
    """Verify the staged payloads, write the side files, then the manifest (the commit).

    A payload is verified by the sha256 the store recorded when the worker wrote it (one HEAD, no
    download); only an object without a recorded checksum is read back and hashed. Readers verify
    every byte again when they use the delta.
    """
    payloads = []
    for result in sorted(results, key=lambda r: r.payload):
        key = _key(prefix, result.payload)
        info = store.info(key)
        recorded = info.sha256 if info.sha256 is not None else hashlib.sha256(store.get_bytes(key)).hexdigest()
        if recorded != result.sha256:
            raise ArtifactError(f"{store.uri_for(key)}: payload differs from what its worker wrote")
        payloads.append(PayloadEntry(result.payload, recorded, info.size, result.layers))
    manifest = Manifest.build(payloads, files, **fields)  # refuses a side file name that is not plain
    for name, data in files.items():
        store.put_bytes(_key(prefix, "files", name), data)
    raw = manifest.to_bytes()
    store.put_bytes(_key(prefix, MANIFEST), raw)
    return _committed(store, prefix, raw, manifest)


def read_commit(store: ObjectStore, prefix: str) -> CommittedDelta | None:
    """The committed delta under ``prefix``, or None when there is no manifest (never committed)."""
    key = _key(prefix, MANIFEST)
    if not store.exists(key):
        return None
    raw = store.get_bytes(key)
    return _committed(store, prefix, raw, Manifest.parse(raw, store.uri_for(key)))


def download_delta(store: ObjectStore, prefix: str, dest: Path, *, expected_sha256: str | None = None) -> Path:
    """Copy the delta under ``prefix`` to the local directory ``dest`` (only what its manifest lists).

    ``expected_sha256`` (a catalog row's) pins the manifest; payload checksums are verified on
    the way down and again by ``DeltaArtifact.open`` when the delta is used.
    """
    key = _key(prefix, MANIFEST)
    raw = store.get_bytes(key)
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise ArtifactError(f"{store.uri_for(key)}: manifest differs from the one the catalog recorded")
    manifest = Manifest.parse(raw, store.uri_for(key))
    (dest / "files").mkdir(parents=True, exist_ok=True)
    for name in manifest.payloads:
        store.get_file(_key(prefix, name), dest / name)
    for name in manifest.files:
        store.get_file(_key(prefix, "files", name), dest / "files" / name)
    (dest / MANIFEST).write_bytes(raw)
    return dest


def _key(prefix: str, *parts: str) -> str:
    return check_key("/".join((prefix, *parts)))


def _committed(store: ObjectStore, prefix: str, raw: bytes, manifest: Manifest) -> CommittedDelta:
    listed = [*manifest.payloads.values(), *manifest.files.values()]
    return CommittedDelta(
        prefix=prefix,
        uri=store.uri_for(prefix),
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        bytes=len(raw) + sum(info.bytes for info in listed),
        budget_bits=manifest.totals.get("budget_bits", 0),
        paper_bits=manifest.totals.get("paper_bits", 0),
    )
