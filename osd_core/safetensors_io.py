"""Reading safetensors files ourselves: headers for planning, one tensor at a time for work.

We parse the header (8-byte little-endian length, then JSON) directly so that planning needs only
the header bytes (two range reads on object storage), so that a truncated or inconsistent file is
refused with a message naming the file and tensor, and so that a tensor is read with one
``readinto`` into memory we own: no memory map keeps a whole shard resident while we stream.
"""

from __future__ import annotations

import math
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: its tensors and string metadata."""

    file: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def parse_header(raw_length: bytes, raw_header: bytes, file: Path, file_size: int) -> Header:
    """Validate and parse header bytes; ``file_size`` lets us refuse truncated files up front."""
    (length,) = struct.unpack("<Q", raw_length)
    try:
        data = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: safetensors header must be a JSON object")
    metadata = data.pop("__metadata__", None) or {}
    base = 8 + length
    tensors: dict[str, TensorEntry] = {}
    for name, spec in data.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(int(s) for s in spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype}")
        entry = TensorEntry(name, file, dtype, shape, base + int(begin), base + int(end))
        expected = entry.numel * torch.empty(0, dtype=DTYPES[dtype]).element_size()
        if entry.end - entry.start != expected or entry.start < base:
            raise CheckpointError(
                f"{file}: tensor {name!r} spans {entry.end - entry.start} bytes, expected {expected} "
                f"for {dtype}{list(shape)}"
            )
        if entry.end > file_size:
            raise CheckpointError(
                f"{file}: truncated: tensor {name!r} ends at byte {entry.end} but the file has {file_size} bytes"
            )
        tensors[name] = entry
    return Header(file, tensors, {str(k): str(v) for k, v in metadata.items()})


def read_header(path: Path) -> Header:
    """Read and validate the header of a local safetensors file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes is too short for a safetensors file")
            (length,) = struct.unpack("<Q", raw_length)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated (header claims {length} bytes, file has {size})"
                )
            raw_header = handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_header(raw_length, raw_header, path, size)


def read_tensor(entry: TensorEntry, handle: BinaryIO | None = None) -> torch.Tensor:
    """Read one tensor's bytes into a fresh CPU tensor of its dtype and shape."""
    out = torch.empty(entry.shape, dtype=entry.torch_dtype)
    view = memoryview(out.view(torch.uint8).reshape(-1).numpy()) if out.numel() else memoryview(b"")
    own = handle is None
    if own:
        handle = entry.file.open("rb")
    try:
        handle.seek(entry.start)
        got = handle.readinto(view) if out.numel() else 0
    finally:
        if own:
            handle.close()
    if got != entry.end - entry.start:
        raise CheckpointError(f"{entry.file}: truncated while reading tensor {entry.name!r}")
    return out
