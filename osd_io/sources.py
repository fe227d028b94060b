"""Read checkpoints, calibration outputs and small files by URI: a local path or ``s3://``.

Why this module: planning must need only safetensors headers (on S3 a HEAD and one or two
ranged GETs per shard, never a download), and a worker must read exactly the tensors of its
layer group. Both go through osd_core's one checkpoint reader; this module supplies the byte
source for a URI: a local directory, or :class:`S3Prefix` over :meth:`ObjectStore.get_range`.
Everything here reads; nothing writes to the source.

A URI is a local path, ``file:///path`` or ``s3://bucket/key``. A checkpoint URI names a
directory (a key prefix on S3) in Hugging Face layout: ``config.json`` plus
``model.safetensors`` or the shards of ``model.safetensors.index.json``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from osd_core.byte_source import ByteSource, LocalDirectory
from osd_core.checkpoint import Checkpoint, hash_identities
from osd_core.disk_cache import cache_root
from osd_core.errors import CheckpointError
from osd_core.file_hashes import HASH_CHUNK_BYTES, sha256_file
from osd_core.safetensors_io import TensorEntry, read_tensor
from osd_io.storage import ObjectStore, open_store
from osd_io.uris import is_s3, join_uri, local_path

log = logging.getLogger(__name__)

@lru_cache(maxsize=64)
def _s3_dir(uri: str) -> ObjectStore:
    """One client per S3 prefix and process: boto3 clients cost ~0.1 s to create and are thread-safe."""
    return open_store(uri)


def _s3_object(uri: str) -> tuple[ObjectStore, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or parent in ("s3:", "s3:/"):
        raise ValueError(f"S3 URI {uri!r} names no object; expected s3://bucket/key")
    return _s3_dir(parent), name


def sha256_of(uri: str) -> str:
    """SHA-256 of a file or object: the recorded one on S3 when present, else read in chunks."""
    if not is_s3(uri):
        return sha256_file(local_path(uri))
    parent, _, name = uri.rstrip("/").rpartition("/")
    _s3_object(uri)  # refuses a URI that names no object
    return S3Prefix(parent).sha256(name)


def fetch_file(uri: str, dest_dir: Path) -> Path:
    """A local path for ``uri``: the file itself when local, else a copy downloaded into ``dest_dir``."""
    if not is_s3(uri):
        path = local_path(uri)
        if not path.is_file():
            raise CheckpointError(f"{uri}: file does not exist")
        return path
    store, key = _s3_object(uri)
    dest_dir.mkdir(parents=True, exist_ok=True)
    store.get_file(key, dest_dir / key)
    return dest_dir / key


class S3Prefix:
    """An object-store prefix as a byte source: ranged GETs, sizes and checksums from HEAD.

    Holds only its URI, so it pickles into Ray tasks; each process opens one client per prefix.
    """

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")

    def __repr__(self) -> str:
        return f"S3Prefix({self.uri!r})"

    @property
    def store(self) -> ObjectStore:
        return _s3_dir(self.uri)

    @property
    def location(self) -> str:
        return self.uri

    @property
    def canonical(self) -> str:
        return self.uri

    def list(self) -> dict[str, int]:
        top = [key for key in self.store.list("") if "/" not in key]
        return {key: self.store.info(key).size for key in sorted(top)}

    def size(self, name: str) -> int:
        return self.store.info(name).size

    def read_range(self, name: str, start: int, into: memoryview) -> int:
        data = self.store.get_range(name, start, len(into)) if len(into) else b""
        into[: len(data)] = data
        return len(data)

    def sha256(self, name: str) -> str:
        info = self.store.info(name)
        if info.sha256 is not None:
            return info.sha256
        log.warning("%s/%s carries no recorded sha256; reading it whole to hash it", self.uri, name)
        digest = hashlib.sha256()
        for start in range(0, info.size, HASH_CHUNK_BYTES):
            digest.update(self.store.get_range(name, start, HASH_CHUNK_BYTES))
        return digest.hexdigest()


def source_for(uri: str) -> ByteSource:
    """The byte source of a directory URI: a local directory, or an S3 prefix."""
    return S3Prefix(uri) if is_s3(uri) else LocalDirectory(local_path(uri))


def open_checkpoint(uri: str) -> Checkpoint:
    """Open the checkpoint at ``uri`` from its headers (osd_core's one reader, over the URI's bytes)."""
    return Checkpoint.open(source_for(uri))


@dataclass(frozen=True)
class TensorRef:
    """One tensor's place: its checkpoint's URI and header entry. Small and picklable, so job
    specs carry these instead of tensors."""

    checkpoint: str
    entry: TensorEntry

    @property
    def uri(self) -> str:
        """The URI of the safetensors file that holds the tensor."""
        return join_uri(self.checkpoint, self.entry.file)

    @property
    def start(self) -> int:
        return self.entry.start

    @property
    def numel(self) -> int:
        return math.prod(self.entry.shape)

    @property
    def nbytes(self) -> int:
        return self.entry.end - self.entry.start

    def read(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, read with one ranged GET (S3) or one seek and read (local): fresh, or into
        ``into``'s bytes (``read_tensor``)."""
        return read_tensor(source_for(self.checkpoint), self.entry, into)


def tensor_refs(checkpoint: Checkpoint) -> dict[str, TensorRef]:
    return {name: TensorRef(checkpoint.location, entry) for name, entry in checkpoint.tensors.items()}


def local_copy(uri: str) -> Path:
    """A local path for a file or object: itself when local, else a download cached on this machine.

    Cached by the object's recorded sha256 (its URI when it has none), so every task on a
    machine, and every rerun, shares one verified copy of the same content.
    """
    if not is_s3(uri):
        return local_path(uri)
    store, key = _s3_object(uri)
    digest = store.info(key).sha256 or hashlib.sha256(uri.encode()).hexdigest()
    target = cache_root() / "objects" / digest[:24] / key
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, target)  # verified, then renamed into place: concurrent copies are harmless
    return target


def materialize(checkpoint: Checkpoint, sha256: str) -> Path:
    """A local directory holding the checkpoint: itself when local, else a cached download.

    Calibration and evaluation need a real Hugging Face directory. Downloads are keyed by the
    content hash and published by rename, so concurrent workers on one machine share one copy.
    """
    if isinstance(checkpoint.source, LocalDirectory):
        return checkpoint.source.path
    target = cache_root() / "checkpoints" / sha256[:24]
    if target.is_dir():
        return target
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        store = _s3_dir(checkpoint.location)
        for name in checkpoint.files:
            store.get_file(name, partial / name)
        try:
            os.rename(partial, target)
        except OSError:  # another worker published it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


@dataclass(frozen=True)
class PairLayout:
    """A base and its fine-tune as their headers describe them, with content identities."""

    base: Checkpoint
    finetuned: Checkpoint
    base_identity: dict[str, str]
    finetuned_identity: dict[str, str]

    @classmethod
    def read(cls, base_uri: str, finetuned_uri: str) -> PairLayout:
        base, finetuned = open_checkpoint(base_uri), open_checkpoint(finetuned_uri)
        hashing = hash_identities(base, finetuned, spare_cores=0)  # the caller waits: both at once
        base_identity, finetuned_identity = (future.result() for future in hashing)
        return cls(base, finetuned, base_identity, finetuned_identity)
