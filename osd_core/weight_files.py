"""Which files of a Hugging Face-layout checkpoint hold its weights, found without reading a tensor.

``model.safetensors``, or the shards ``model.safetensors.index.json`` lists; a directory of
pickle files only is refused with the reason. Kept apart from :mod:`osd_core.checkpoint`, and free
of torch, so the command line can name the shards (and start hashing them) before it pays for
torch's import (:func:`osd_core.file_hashes.hashing_ahead`).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from .byte_source import ByteSource, LocalDirectory, read_bytes, where
from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".onnx")


def weight_files(source: ByteSource, files: dict[str, int]) -> tuple[str, ...]:
    """The shard names of the checkpoint in ``source``, whose top-level ``files`` are given."""
    index = where(source, INDEX_FILE)
    if INDEX_FILE in files:
        weight_map = read_json(source, INDEX_FILE, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                raise CheckpointError(f"{index}: shard name {name!r} must be a plain file name in {source.location}")
            if name not in files:
                raise CheckpointError(f"{index}: lists shard {name!r}, which is missing from {source.location}")
        return tuple(names)
    if SINGLE_FILE in files:
        return (SINGLE_FILE,)
    pickles = sorted(name for name in files if PurePosixPath(name).suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{source.location}: holds only pickle checkpoints ({', '.join(pickles)}); osd-fleet reads "
            "safetensors only and never unpickles (convert with `save_pretrained(..., safe_serialization=True)`)"
        )
    raise CheckpointError(f"{source.location}: no {SINGLE_FILE} or {INDEX_FILE} found")


def local_shards(directory: Path) -> list[Path]:
    """The weight files of a local checkpoint directory; none where it is not one yet.

    For work done ahead only: the caller opens the checkpoint properly later, and that open
    reports what is wrong with it, so nothing is reported here.
    """
    source = LocalDirectory(directory)
    try:
        return [directory / name for name in weight_files(source, source.list())]
    except (OSError, CheckpointError):
        return []


def read_json(source: ByteSource, name: str, what: str) -> dict:
    """A JSON object file of ``source``; a missing or malformed one names the file and ``what`` it is."""
    shown = where(source, name)
    try:
        data = json.loads(read_bytes(source, name).decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{shown}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{shown}: cannot read {what} ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown}: {what} must be a JSON object")
    return data
