"""Hugging Face-layout checkpoints, read from any byte source by headers and one tensor at a time.

A checkpoint is ``config.json`` plus either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``, in a local directory or an object-store prefix (any
:class:`~osd_core.byte_source.ByteSource`). Opening one reads the configuration, the index and
each shard's header, nothing more; planning needs no weights. Pickle files (``*.bin``, ``*.pt``,
``*.pth``, ``*.ckpt``) are never opened: unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from .byte_source import ByteSource, LocalDirectory, read_bytes, where
from .errors import CheckpointError, MissingTensorError
from .safetensors_io import TensorEntry, read_header, read_tensor
from .weight_files import WEIGHT_SUFFIXES, read_json, weight_files

SIDE_FILE_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as its headers describe it: configuration, every tensor's location, its files.

    ``files`` maps every top-level file to its size; ``shards`` names the weight files.
    """

    source: ByteSource
    config: dict[str, Any]
    tensors: dict[str, TensorEntry]
    shards: tuple[str, ...]
    files: dict[str, int]

    @classmethod
    def open(cls, at: ByteSource | str | Path) -> Checkpoint:
        """Open a checkpoint from a byte source, or from a local directory's path."""
        source = at if isinstance(at, ByteSource) else LocalDirectory(at)
        if isinstance(source, LocalDirectory) and not source.path.is_dir():
            raise CheckpointError(f"{source.location}: checkpoint directory does not exist")
        try:
            files = source.list()
        except OSError as exc:
            raise CheckpointError(f"{source.location}: cannot list the checkpoint ({exc.strerror or exc})") from None
        if "config.json" not in files:
            raise CheckpointError(f"{where(source, 'config.json')}: missing (the model configuration)")
        config = read_json(source, "config.json", "the model configuration")
        shards = weight_files(source, files)
        tensors: dict[str, TensorEntry] = {}
        for shard in shards:
            for name, entry in read_header(source, shard).tensors.items():
                if name in tensors:
                    raise CheckpointError(
                        f"{source.location}: tensor {name!r} appears in both {tensors[name].file} and {shard}"
                    )
                tensors[name] = entry
        if not tensors:
            raise CheckpointError(f"{source.location}: the checkpoint holds no tensors")
        return cls(source, config, dict(sorted(tensors.items())), shards, files)

    @property
    def location(self) -> str:
        return self.source.location

    @property
    def is_local(self) -> bool:
        """Whether the bytes are in a local directory rather than an object store."""
        return isinstance(self.source, LocalDirectory)

    @property
    def local_dir(self) -> Path:
        """The directory of a local checkpoint (transformers needs one to load a model)."""
        if not isinstance(self.source, LocalDirectory):
            raise CheckpointError(f"{self.location}: not a local directory")
        return self.source.path

    @property
    def model_type(self) -> str:
        model_type = self.config.get("model_type")
        if not isinstance(model_type, str):
            raise CheckpointError(f"{where(self.source, 'config.json')}: no 'model_type' string")
        return model_type

    @property
    def nbytes(self) -> int:
        return sum(entry.end - entry.start for entry in self.tensors.values())

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise MissingTensorError(f"{self.location}: tensor {name!r} is missing") from None

    def load(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (no other tensor is kept in memory), fresh or into ``into``'s bytes (``read_tensor``)."""
        return read_tensor(self.source, self.entry(name), into)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors in file order, shard by shard, so reads run forward through each file."""
        wanted = list(self.tensors) if names is None else names
        for entry in sorted((self.entry(name) for name in wanted), key=lambda e: (e.file, e.start)):
            yield entry.name, read_tensor(self.source, entry)

    def read_file(self, name: str) -> bytes:
        """A small top-level file, whole."""
        try:
            return read_bytes(self.source, name)
        except OSError as exc:
            raise CheckpointError(f"{where(self.source, name)}: cannot read ({exc.strerror or exc})") from None

    def identity(self) -> dict[str, str]:
        """Location and a content hash over the shards (in name order), for provenance checks.

        A local copy and its upload hash alike, so reconstruction's base check passes whichever
        side the delta was made from; object stores give their recorded checksums.
        """
        digest = hashlib.sha256()
        for shard in sorted(self.shards):
            digest.update(shard.encode())
            digest.update(self.source.sha256(shard).encode())
        return {"path": self.source.canonical, "sha256": digest.hexdigest()}

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


def hash_identities(*checkpoints: Checkpoint, spare_cores: int = 2) -> list[Future[dict[str, str]]]:
    """Each checkpoint's :meth:`Checkpoint.identity`, computed on threads while the caller works on.

    SHA-256 runs at about 1 GB/s a core: 2 × 13.5 GB of a 7B pair would be 25 s in line, most of a
    GPU run's minute. On threads (hashlib releases the GIL) it is off the critical path wherever a
    core is free; ``spare_cores`` are left to the caller's own work (0 for a caller that only waits).
    On 2 cores, hashing beside compression measured no slower than hashing inside the reads.
    """
    workers = min(len(checkpoints), max(1, (os.cpu_count() or 1) - spare_cores))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="osd-hash")
    try:
        return [pool.submit(checkpoint.identity) for checkpoint in checkpoints]
    finally:
        pool.shutdown(wait=False)


def side_files(base: Checkpoint, finetuned: Checkpoint) -> dict[str, bytes]:
    """Small files of the fine-tune that the base lacks or has different (``config.json`` always)."""
    files = {}
    for name in finetuned.side_file_names():
        data = finetuned.read_file(name)
        if name == "config.json" or name not in base.files or base.read_file(name) != data:
            files[name] = data
    return files
