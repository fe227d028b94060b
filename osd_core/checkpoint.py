"""Hugging Face-layout checkpoint directories, read safely and one tensor at a time.

A checkpoint is ``config.json`` plus either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Pickle files (``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are
never opened: unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, MissingTensorError
from .safetensors_io import Header, TensorEntry, read_header, read_tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Checkpoint:
    """The plan-level view of a checkpoint: config and every tensor's location, from headers only."""

    path: Path
    config: dict
    tensors: dict[str, TensorEntry]
    files: tuple[Path, ...]

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory does not exist")
        config = _read_json(path / "config.json", "the model configuration")
        files = _weight_files(path)
        tensors: dict[str, TensorEntry] = {}
        for file in files:
            header: Header = read_header(file)
            for name, entry in header.tensors.items():
                if name in tensors:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} appears in both {tensors[name].file.name} and {file.name}"
                    )
                tensors[name] = entry
        if not tensors:
            raise CheckpointError(f"{path}: the checkpoint holds no tensors")
        return cls(path, config, dict(sorted(tensors.items())), files)

    @property
    def model_type(self) -> str:
        model_type = self.config.get("model_type")
        if not isinstance(model_type, str):
            raise CheckpointError(f"{self.path / 'config.json'}: no 'model_type' string")
        return model_type

    @property
    def nbytes(self) -> int:
        return sum(entry.end - entry.start for entry in self.tensors.values())

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.tensors[name]
        except KeyError:
            raise MissingTensorError(f"{self.path}: tensor {name!r} is missing") from None

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (no other tensor is kept in memory)."""
        return read_tensor(self.entry(name))

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield tensors grouped by shard so each file is opened once."""
        wanted = list(self.tensors) if names is None else names
        by_file: dict[Path, list[TensorEntry]] = {}
        for name in wanted:
            entry = self.entry(name)
            by_file.setdefault(entry.file, []).append(entry)
        for file, entries in by_file.items():
            with file.open("rb") as handle:
                for entry in sorted(entries, key=lambda e: e.start):
                    yield entry.name, read_tensor(entry, handle)

    def identity(self) -> dict[str, str]:
        """Path and a content hash over the weight files (in name order), for provenance checks."""
        digest = hashlib.sha256()
        for file in sorted(self.files, key=lambda f: f.name):
            digest.update(file.name.encode())
            digest.update(sha256_file(file).encode())
        return {"path": str(self.path.resolve()), "sha256": digest.hexdigest()}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _weight_files(path: Path) -> tuple[Path, ...]:
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object")
        names = sorted(set(weight_map.values()))
        for name in names:
            if "/" in name or "\\" in name or name.startswith("."):
                raise CheckpointError(f"{index}: shard name {name!r} must be a plain file name in {path}")
            if not (path / name).is_file():
                raise CheckpointError(f"{index}: lists shard {name!r}, which is missing from {path}")
        return tuple(path / name for name in names)
    if single.is_file():
        return (single,)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: holds only pickle checkpoints ({', '.join(pickles)}); osd-fleet reads safetensors "
            "only and never unpickles (convert with `save_pretrained(..., safe_serialization=True)`)"
        )
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return data
