"""Reading and writing safetensors files ourselves: headers for planning, one tensor at a time for work.

We parse the header (8-byte little-endian length, then JSON) directly so that planning needs only
the header bytes (one or two range reads on object storage), so that a truncated or inconsistent
file is refused with a message naming the file and tensor, and so that a tensor is read with one
range read into memory we own: no memory map keeps a whole shard resident while we stream.
Every read goes through a :class:`~osd_core.byte_source.ByteSource`, local or remote alike.
Writing streams each tensor's bytes from its own memory: ``safetensors.torch.save_file`` first
copies every tensor into one Python ``bytes`` object, which doubles the peak of a large file.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .byte_source import ByteSource, read_bytes, where
from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_PROBE_BYTES = 64 * 1024  # one range read covers the header of most shards

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
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
HEADER_ALIGNMENT = 8  # the reference writer pads the header so that tensor data starts aligned


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file's name in the source, dtype, shape and absolute byte range."""

    name: str
    file: str
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

    file: str
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def parse_header(raw_length: bytes, raw_header: bytes, file: str, file_size: int, shown: str | None = None) -> Header:
    """Validate and parse header bytes as the reference implementation does, or refuse them.

    ``file_size`` lets us refuse truncated files up front. The tensors' byte ranges must tile the
    data section exactly (sorted by offset, no gap, no overlap, nothing after the last one): an
    overlap would let one tensor silently read another's bytes. Metadata must map strings to
    strings. Every field is type-checked, so a hand-made header fails with a message, not a crash.
    ``file`` is the file's name in its source; ``shown`` is how messages name it (``file`` by default).
    """
    shown = file if shown is None else shown
    (length,) = struct.unpack("<Q", raw_length)
    try:
        data = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{shown}: safetensors header is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown}: safetensors header must be a JSON object")
    metadata = data.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{shown}: safetensors __metadata__ must map strings to strings")
    base = 8 + length
    tensors = {name: _entry(name, spec, file, shown, base) for name, spec in data.items()}
    position = base
    for entry in sorted(tensors.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position:
            what = "overlaps the tensor before it" if entry.start < position else "leaves a gap before it"
            raise CheckpointError(
                f"{shown}: tensor {entry.name!r} starts at data offset {entry.start - base}, which {what} "
                f"(expected {position - base}): byte ranges must be contiguous and must not overlap"
            )
        position = entry.end
    if position > file_size:
        last = max(tensors.values(), key=lambda e: e.end).name
        raise CheckpointError(
            f"{shown}: truncated: tensor {last!r} ends at byte {position} but the file has {file_size} bytes"
        )
    if position < file_size:
        raise CheckpointError(
            f"{shown}: {file_size - position} bytes follow the last tensor's data; a safetensors file ends there"
        )
    return Header(file, tensors, dict(metadata))


def _entry(name: str, spec: object, file: str, shown: str, base: int) -> TensorEntry:
    """One header entry, every field checked: dtype name, shape of naturals, two ordered offsets."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{shown}: tensor {name!r} needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        shown = dtype if isinstance(dtype, str) else repr(dtype)
        raise CheckpointError(f"{shown}: tensor {name!r} has unsupported dtype {shown}")
    if not isinstance(shape, list) or not all(_natural(s) for s in shape):
        raise CheckpointError(f"{shown}: tensor {name!r} has shape {shape!r}; expected a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{shown}: tensor {name!r} has data_offsets {offsets!r}; expected [begin, end], "
                              "0 <= begin <= end")
    entry = TensorEntry(name, file, dtype, tuple(shape), base + offsets[0], base + offsets[1])
    expected = entry.numel * torch.empty(0, dtype=DTYPES[dtype]).element_size()
    if entry.end - entry.start != expected:
        raise CheckpointError(
            f"{shown}: tensor {name!r} spans {entry.end - entry.start} bytes, expected {expected} "
            f"for {dtype}{list(shape)}"
        )
    return entry


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(source: ByteSource, name: str) -> Header:
    """Read and validate the header of safetensors file ``name``: one range read, two for a large header."""
    shown = where(source, name)
    try:
        size = source.size(name)
        probe = read_bytes(source, name, 0, min(size, HEADER_PROBE_BYTES))
        if len(probe) < 8:
            raise CheckpointError(f"{shown}: truncated: {size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", probe[:8])
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise CheckpointError(
                f"{shown}: not a safetensors file or truncated (header claims {length} bytes, file has {size})"
            )
        raw_header = probe[8 : 8 + length]
        if len(raw_header) < length:
            raw_header += read_bytes(source, name, len(probe), 8 + length - len(probe))
    except OSError as exc:
        raise CheckpointError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    return parse_header(probe[:8], raw_header, name, size, shown)


def read_tensor(source: ByteSource, entry: TensorEntry, into: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor's bytes into a CPU tensor of its dtype and shape (one range read).

    The tensor is fresh, or a view of the start of ``into`` (a 1-D ``uint8`` tensor of at least
    the tensor's bytes), which the next read into it overwrites.
    """
    if into is None:
        out = torch.empty(entry.shape, dtype=entry.torch_dtype)
    else:
        out = into[: entry.end - entry.start].view(entry.torch_dtype).view(entry.shape)
    if not out.numel():
        return out
    view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
    try:
        got = source.read_range(entry.file, entry.start, view)
    except OSError as exc:
        raise CheckpointError(f"{where(source, entry.file)}: cannot read ({exc.strerror or exc})") from None
    if got != entry.end - entry.start:
        raise CheckpointError(f"{where(source, entry.file)}: truncated while reading tensor {entry.name!r}")
    return out


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                      ) -> Path:
    """Write ``tensors`` to ``path`` in the safetensors format, one tensor's bytes at a time.

    Tensors are laid out in name order and the header is padded with spaces to a multiple of 8, as
    the reference writer pads it, so any safetensors reader reads the file. Memory beyond the
    tensors themselves is one tensor's contiguous copy at most, where a tensor is not contiguous.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    path = Path(path)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name in sorted(tensors):
            tensor = tensors[name].detach().cpu().contiguous()
            if tensor.numel():
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return path
