"""Payload files of format version 5: every layer's parts in one tensor, their layout compressed.

Up to version 4 each part of each layer was a tensor of its own (``<tensor>::u.values``), and the
safetensors header spent about 110 bytes of JSON on each: 34 KB of a 205 KB MiniLM delta at
r = 0.25. A version-5 payload is still a safetensors file, with one ``uint8`` tensor ``data``
holding every part's bytes back to back, and the layout (each layer's parts: name, dtype, shape,
in data order) as compressed JSON in the header's metadata (``osd_core.packed_json``). Any safetensors reader opens it;
osd-fleet reads one layer's parts with one range read each, as before.

The layout is checked whole before any part is read: the parts must tile ``data`` exactly, with
known dtypes, and it must decompress within a bound, so a damaged or hostile header is refused
with a message and never allocates more than the file could hold.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence

import torch

from . import packed_json
from .errors import ArtifactError
from .safetensors_io import DTYPE_NAMES, DTYPES, HEADER_ALIGNMENT, Header, TensorEntry

DATA = "data"
LAYOUT = "layout"


def pack(layers: Sequence[tuple[str, Mapping[str, torch.Tensor]]], fmt: str) -> bytes:
    """The payload file of ``layers`` (name, parts), as bytes; the same input gives the same bytes."""
    layout, chunks = [], []
    for name, parts in layers:
        entries = []
        for part in sorted(parts):
            tensor = parts[part].detach().cpu().contiguous()
            if tensor.dtype not in DTYPE_NAMES:
                raise ArtifactError(f"{name}: part {part!r} has dtype {tensor.dtype}, which a payload cannot store")
            entries.append([part, DTYPE_NAMES[tensor.dtype], list(tensor.shape)])
            chunks.append(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        layout.append([name, entries])
    size = sum(len(chunk) for chunk in chunks)
    header = {"__metadata__": {"format": fmt, LAYOUT: packed_json.encode(layout)},
              DATA: {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    return b"".join([struct.pack("<Q", len(raw)), raw, *chunks])  # one copy of the parts' bytes


def layout(header: Header, shown: object) -> dict[str, dict[str, TensorEntry]]:
    """Every layer's part entries (byte ranges in the file) from a version-5 payload's header."""
    data = header.tensors.get(DATA)
    if set(header.tensors) != {DATA} or data.dtype != "U8" or LAYOUT not in header.metadata:
        raise ArtifactError(f"{shown}: a version-5 payload holds one uint8 tensor {DATA!r} and its "
                            f"{LAYOUT!r} in the header's metadata")
    listed = packed_json.decode(header.metadata[LAYOUT], shown, "payload layout")
    if not isinstance(listed, list):
        raise ArtifactError(f"{shown}: payload layout must be a list of [layer, parts]")
    layers: dict[str, dict[str, TensorEntry]] = {}
    position = data.start
    for item in listed:
        name, parts = _layer(item, shown)
        if name in layers:
            raise ArtifactError(f"{shown}: layer {name!r} appears twice in the payload layout")
        entries = {}
        for part, dtype, shape in parts:
            size = math.prod(shape) * torch.empty(0, dtype=DTYPES[dtype]).element_size()
            entries[part] = TensorEntry(f"{name}::{part}", header.file, dtype, tuple(shape), position, position + size)
            position += size
        layers[name] = entries
    if position != data.end:
        raise ArtifactError(f"{shown}: payload layout covers {position - data.start} bytes of data, the file holds "
                            f"{data.end - data.start}")
    return layers


def _layer(item: object, shown: object) -> tuple[str, list[tuple[str, str, list[int]]]]:
    """One ``[layer, [[part, dtype, shape], ...]]`` of the layout, every field checked."""
    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], list)):
        raise ArtifactError(f"{shown}: payload layout entries must be [layer name, parts], got {str(item)[:80]}")
    name, parts = item
    checked = []
    for part in parts:
        if not (isinstance(part, list) and len(part) == 3 and isinstance(part[0], str) and part[1] in DTYPES
                and isinstance(part[2], list)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in part[2])):
            raise ArtifactError(f"{shown}: layer {name!r} has a malformed part {str(part)[:80]} in the payload "
                                "layout (expected [name, dtype, shape])")
        checked.append((part[0], part[1], part[2]))
    return name, checked
