"""Read checkpoints, calibration outputs and small files by URI: a local path or ``s3://``.

Why this module: planning must need only safetensors headers (on S3 a HEAD and one or two
ranged GETs per shard, never a download), and a worker must read exactly the tensors of its
layer group. Local paths go through osd_core's own readers; S3 objects through
:meth:`ObjectStore.get_range`. Everything here reads; nothing writes to the source.

A URI is a local path, ``file:///path`` or ``s3://bucket/key``. A checkpoint URI names a
directory (a key prefix on S3) in Hugging Face layout: ``config.json`` plus
``model.safetensors`` or the shards of ``model.safetensors.index.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import torch

from osd_core.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, sha256_file
from osd_core.compress import SIDE_FILE_LIMIT, WEIGHT_SUFFIXES
from osd_core.errors import CheckpointError
from osd_core.safetensors_io import DTYPES, MAX_HEADER_BYTES, TensorEntry, parse_header, read_header, read_tensor
from osd_io.storage import ObjectStore, open_store

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
HEADER_PROBE_BYTES = 64 * 1024  # one ranged GET covers the header of most shards
HASH_CHUNK_BYTES = 8 * 1024 * 1024


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def local_path(uri: str) -> Path:
    """The local path of a plain path or ``file://`` URI (refuses ``s3://``)."""
    if is_s3(uri):
        raise ValueError(f"{uri} is not a local path")
    if uri.startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    return Path(uri).expanduser()


def join_uri(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}" if is_s3(uri) else str(local_path(uri) / name)


@lru_cache(maxsize=64)
def _s3_dir(uri: str) -> ObjectStore:
    """One client per S3 prefix and process: boto3 clients cost ~0.1 s to create and are thread-safe."""
    return open_store(uri)


def _s3_object(uri: str) -> tuple[ObjectStore, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or parent in ("s3:", "s3:/"):
        raise ValueError(f"S3 URI {uri!r} names no object; expected s3://bucket/key")
    return _s3_dir(parent), name


def read_bytes(uri: str) -> bytes:
    """A whole (small) object or file; S3 objects written by osd-fleet are checksum-verified."""
    if is_s3(uri):
        store, key = _s3_object(uri)
        return store.get_bytes(key)
    try:
        return local_path(uri).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{uri}: cannot read ({exc.strerror})") from None


def sha256_of(uri: str) -> str:
    """SHA-256 of a file or object: the recorded one on S3 when present, else read in chunks."""
    if not is_s3(uri):
        return sha256_file(local_path(uri))
    store, key = _s3_object(uri)
    info = store.info(key)
    if info.sha256 is not None:
        return info.sha256
    log.warning("%s carries no recorded sha256; reading it whole to hash it", uri)
    digest = hashlib.sha256()
    for start in range(0, info.size, HASH_CHUNK_BYTES):
        digest.update(store.get_range(key, start, HASH_CHUNK_BYTES))
    return digest.hexdigest()


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


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: the safetensors file's URI, dtype, shape and byte range.

    Small and picklable: job specs carry these instead of tensors.
    """

    uri: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self) -> torch.Tensor:
        """The tensor, read with one ranged GET (S3) or one seek and read (local)."""
        if not is_s3(self.uri):
            entry = TensorEntry(self.name, local_path(self.uri), self.dtype, self.shape, self.start, self.end)
            return read_tensor(entry)
        store, key = _s3_object(self.uri)
        length = self.end - self.start
        data = store.get_range(key, self.start, length) if length else b""
        if len(data) != length:
            raise CheckpointError(f"{self.uri}: truncated while reading tensor {self.name!r}")
        if not length:
            return torch.empty(self.shape, dtype=DTYPES[self.dtype])
        return torch.frombuffer(bytearray(data), dtype=DTYPES[self.dtype]).reshape(self.shape)


def read_safetensors_header(uri: str) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensor references and string metadata of one safetensors file, from its header only."""
    if not is_s3(uri):
        header = read_header(local_path(uri))
        return _refs(uri, header.tensors), header.metadata
    store, key = _s3_object(uri)
    size = store.info(key).size
    probe = store.get_range(key, 0, min(size, HEADER_PROBE_BYTES))
    if len(probe) < 8:
        raise CheckpointError(f"{uri}: truncated: {size} bytes is too short for a safetensors file")
    (length,) = struct.unpack("<Q", probe[:8])
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise CheckpointError(
            f"{uri}: not a safetensors file or truncated (header claims {length} bytes, object has {size})"
        )
    raw = probe[8 : 8 + length]
    if len(raw) < length:
        raw += store.get_range(key, len(probe), 8 + length - len(probe))
    where = Path(uri.removeprefix(S3_SCHEME))
    try:
        header = parse_header(probe[:8], raw, where, size)
    except CheckpointError as exc:  # name the object by its URI, not the path stand-in
        raise CheckpointError(str(exc).replace(str(where), uri, 1)) from None
    return _refs(uri, header.tensors), header.metadata


def _refs(uri: str, entries: Mapping[str, TensorEntry]) -> dict[str, TensorRef]:
    return {n: TensorRef(uri, n, e.dtype, e.shape, e.start, e.end) for n, e in entries.items()}


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


@dataclass(frozen=True)
class CheckpointLayout:
    """A checkpoint as its headers describe it: configuration, every tensor's location, small files.

    Opening reads ``config.json``, the shard index and each shard's header, nothing more.
    ``files`` lists the top-level non-weight files (side-file candidates) with their sizes.
    """

    uri: str
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    shards: tuple[str, ...]
    files: dict[str, int]

    @classmethod
    def open(cls, uri: str) -> CheckpointLayout:
        if not is_s3(uri):
            checkpoint = Checkpoint.open(local_path(uri))
            files = {p.name: p.stat().st_size for p in sorted(checkpoint.path.iterdir()) if p.is_file()}
            tensors = {
                n: TensorRef(str(e.file), n, e.dtype, e.shape, e.start, e.end) for n, e in checkpoint.tensors.items()
            }
            return cls(str(checkpoint.path), checkpoint.config, tensors, tuple(f.name for f in checkpoint.files), files)
        listing = _s3_dir(uri.rstrip("/")).list("")
        top = sorted(key for key in listing if "/" not in key)
        if "config.json" not in top:
            raise CheckpointError(f"{uri}: missing config.json (not a checkpoint prefix?)")
        config = _json(uri, "config.json")
        shards = _s3_shards(uri, top)
        tensors: dict[str, TensorRef] = {}
        for shard in shards:
            refs, _ = read_safetensors_header(join_uri(uri, shard))
            clash = set(refs) & set(tensors)
            if clash:
                name = sorted(clash)[0]
                raise CheckpointError(
                    f"{uri}: tensor {name!r} appears in both {PurePosixPath(tensors[name].uri).name} and {shard}"
                )
            tensors.update(refs)
        if not tensors:
            raise CheckpointError(f"{uri}: the checkpoint holds no tensors")
        store = _s3_dir(uri.rstrip("/"))
        files = {key: store.info(key).size for key in top}
        return cls(uri.rstrip("/"), config, dict(sorted(tensors.items())), shards, files)

    def plan_view(self) -> Checkpoint:
        """An osd_core ``Checkpoint`` of headers only, for ``osd_core.compress.plan_pair``."""
        entries = {n: TensorEntry(n, Path(r.uri), r.dtype, r.shape, r.start, r.end) for n, r in self.tensors.items()}
        return Checkpoint(Path(self.uri), self.config, entries, ())

    def identity(self) -> dict[str, str]:
        """Location and content hash, computed exactly as ``Checkpoint.identity`` does.

        Equal hashes for a local copy and its S3 upload, so reconstruction's base check passes
        whichever side the delta was made from. On S3 the recorded checksums are used.
        """
        digest = hashlib.sha256()
        for shard in sorted(self.shards):
            digest.update(shard.encode())
            digest.update(sha256_of(join_uri(self.uri, shard)).encode())
        location = self.uri if is_s3(self.uri) else str(local_path(self.uri).resolve())
        return {"path": location, "sha256": digest.hexdigest()}

    def read_file(self, name: str) -> bytes:
        return read_bytes(join_uri(self.uri, name))

    def side_file_names(self) -> list[str]:
        """Top-level files that may travel with a delta: not weights, not hidden, not large."""
        return [
            name
            for name, size in sorted(self.files.items())
            if PurePosixPath(name).suffix not in WEIGHT_SUFFIXES
            and not name.endswith(".index.json")
            and not name.startswith(".")
            and size <= SIDE_FILE_LIMIT
        ]


def side_files(base: CheckpointLayout, finetuned: CheckpointLayout) -> dict[str, bytes]:
    """Small files of the fine-tune that the base lacks or has different (``config.json`` always).

    The rule of ``osd_core.compress``'s single-process path, over URIs.
    """
    files = {}
    for name in finetuned.side_file_names():
        data = finetuned.read_file(name)
        if name == "config.json" or name not in base.files or base.read_file(name) != data:
            files[name] = data
    return files


def materialize(layout: CheckpointLayout, sha256: str) -> Path:
    """A local directory holding the checkpoint: itself when local, else a cached download.

    Calibration and evaluation need a real Hugging Face directory. Downloads are keyed by the
    content hash and published by rename, so concurrent workers on one machine share one copy.
    """
    if not is_s3(layout.uri):
        return local_path(layout.uri)
    target = cache_root() / "checkpoints" / sha256[:24]
    if target.is_dir():
        return target
    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    partial.mkdir(parents=True)
    try:
        store = _s3_dir(layout.uri)
        for name in layout.files:
            store.get_file(name, partial / name)
        try:
            os.rename(partial, target)
        except OSError:  # another worker published it first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def cache_root() -> Path:
    """``$OSD_FLEET_CACHE`` or ``~/.cache/osd-fleet`` (shared with the workloads cache)."""
    return Path(os.environ.get("OSD_FLEET_CACHE") or Path.home() / ".cache" / "osd-fleet")


def _json(uri: str, name: str) -> dict[str, Any]:
    try:
        data = json.loads(read_bytes(join_uri(uri, name)))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{join_uri(uri, name)}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{join_uri(uri, name)}: must hold a JSON object")
    return data


def _s3_shards(uri: str, top: list[str]) -> tuple[str, ...]:
    if INDEX_FILE in top:
        weight_map = _json(uri, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{join_uri(uri, INDEX_FILE)}: expected a non-empty 'weight_map' object")
        shards = tuple(sorted(set(weight_map.values())))
        for shard in shards:
            if "/" in shard or shard.startswith(".") or shard not in top:
                raise CheckpointError(
                    f"{join_uri(uri, INDEX_FILE)}: lists shard {shard!r}, which is not an object under {uri}"
                )
        return shards
    if SINGLE_FILE in top:
        return (SINGLE_FILE,)
    raise CheckpointError(f"{uri}: no {SINGLE_FILE} or {INDEX_FILE} found (osd-fleet reads safetensors only)")


@dataclass(frozen=True)
class PairLayout:
    """A base and its fine-tune as their headers describe them, with content identities."""

    base: CheckpointLayout
    finetuned: CheckpointLayout
    base_identity: dict[str, str]
    finetuned_identity: dict[str, str]

    @classmethod
    def read(cls, base_uri: str, finetuned_uri: str) -> PairLayout:
        base, finetuned = CheckpointLayout.open(base_uri), CheckpointLayout.open(finetuned_uri)
        return cls(base, finetuned, base.identity(), finetuned.identity())
