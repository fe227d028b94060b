"""Reading safetensors files ourselves: headers for planning, one tensor at a time for work.

We parse the header (8-byte little-endian length, then JSON) directly so that planning needs only
the header bytes (two range reads on object storage), so that a truncated or inconsistent file is
refused with a message naming the file and tensor, and so that a tensor is read with one
``readinto`` into memory we own: no memory map keeps a whole shard resident while we stream.
"""

from __future__ import annotations

import json
import math
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
    """Validate and parse header bytes as the reference implementation does, or refuse them.

    ``file_size`` lets us refuse truncated files up front. The tensors' byte ranges must tile the
    data section exactly (sorted by offset, no gap, no overlap, nothing after the last one): an
    overlap would let one tensor silently read another's bytes. Metadata must map strings to
    strings. Every field is type-checked, so a hand-made header fails with a message, not a crash.
    """
    (length,) = struct.unpack("<Q", raw_length)
    try:
        data = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{file}: safetensors header is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: safetensors header must be a JSON object")
    metadata = data.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: safetensors __metadata__ must map strings to strings")
    base = 8 + length
    tensors = {name: _entry(name, spec, file, base) for name, spec in data.items()}
    position = base
    for entry in sorted(tensors.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            what = "overlaps the tensor before it" if entry.start < position else "leaves a gap before it"
            raise CheckpointError(
                f"{file}: tensor {entry.name!r} starts at data offset {entry.start - base}, which {what} "
                f"(expected {position - base}): byte ranges must be contiguous and must not overlap"
            )
        position = entry.end
    if position > file_size:
        last = max(tensors.values(), key=lambda e: e.end).name
        raise CheckpointError(
            f"{file}: truncated: tensor {last!r} ends at byte {position} but the file has {file_size} bytes"
        )
    if position < file_size:
        raise CheckpointError(
            f"{file}: {file_size - position} bytes follow the last tensor's data; a safetensors file ends there"
        )
    return Header(file, tensors, dict(metadata))


def _entry(name: str, spec: object, file: Path, base: int) -> TensorEntry:
    """One header entry, every field checked: dtype name, shape of naturals, two ordered offsets."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{file}: tensor {name!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        shown = dtype if isinstance(dtype, str) else repr(dtype)
        raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {shown}")
    if not isinstance(shape, list) or not all(_natural(s) for s in shape):
        raise CheckpointError(f"{file}: tensor {name!r} has shape {shape!r}; expected a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{file}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], "
                              "0 <= begin <= end")
    entry = TensorEntry(name, file, dtype, tuple(shape), base + offsets[0], base + offsets[1])
    expected = entry.numel * torch.empty(0, dtype=DTYPES[dtype]).element_size()
    if entry.end - entry.start != expected:
        raise CheckpointError(
            f"{file}: tensor {name!r} spans {entry.end - entry.start} bytes, expected {expected} "
            f"for {dtype}{list(shape)}"
        )
    return entry


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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
