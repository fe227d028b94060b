"""Version-5 payloads: one data tensor and a compressed layout, refused whole when either is damaged."""

import base64
import json
import struct

import pytest
import torch
import zstandard

from osd_core.byte_source import LocalDirectory
from osd_core.errors import ArtifactError
from osd_core.packed_json import MAX_BYTES
from osd_core.packed_payload import layout, pack
from osd_core.safetensors_io import read_header, read_tensor

LAYERS = [
    ("encoder.0.query", {"u.values": torch.tensor([1, -2, 3], dtype=torch.int8),
                         "u.scale": torch.tensor([0.5, 0.25]), "u.index": torch.tensor([0, 5, 7], dtype=torch.int16)}),
    ("encoder.0.bias", {"values": torch.tensor([1.5, -1.0], dtype=torch.float16)}),
]


def write(tmp_path, data: bytes):
    (tmp_path / "payload-00000.safetensors").write_bytes(data)
    return LocalDirectory(tmp_path), "payload-00000.safetensors"


def with_layout(listed: object) -> bytes:
    """A payload whose layout is ``listed`` (any JSON), over the bytes LAYERS pack to."""
    packed = pack(LAYERS, "osd-fleet-delta/5")
    (length,) = struct.unpack("<Q", packed[:8])
    header = json.loads(packed[8:8 + length])
    raw = zstandard.ZstdCompressor().compress(json.dumps(listed).encode())
    header["__metadata__"]["layout"] = base64.b64encode(raw).decode()
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + packed[8 + length:]


def test_parts_come_back_exactly_and_the_header_stays_small(tmp_path):
    source, name = write(tmp_path, pack(LAYERS, "osd-fleet-delta/5"))
    header = read_header(source, name)
    assert list(header.tensors) == ["data"] and header.metadata["format"] == "osd-fleet-delta/5"
    parts = layout(header, name)
    assert list(parts) == [layer for layer, _ in LAYERS]
    for layer, tensors in LAYERS:
        assert parts[layer].keys() == tensors.keys()
        for part, tensor in tensors.items():
            read = read_tensor(source, parts[layer][part])
            assert read.dtype == tensor.dtype and torch.equal(read, tensor)
    assert pack(LAYERS, "osd-fleet-delta/5") == pack(LAYERS, "osd-fleet-delta/5")  # deterministic


def test_the_header_costs_a_few_bytes_per_layer_not_a_hundred_per_part():
    many = [(f"model.layers.{i}.self_attn.q_proj.weight", {part: torch.zeros(4, dtype=torch.int8) for part in
                                                          ("u.values", "u.bitmap", "v.values", "v.bitmap")})
            for i in range(100)]
    packed = pack(many, "osd-fleet-delta/5")
    (length,) = struct.unpack("<Q", packed[:8])
    assert length < 2_000  # one entry per part was about 110 bytes: 44 KB here


@pytest.mark.parametrize("listed, match", [
    ([["encoder.0.query", [["u.values", "I8", [3]]]]], "covers 3 bytes of data, the file holds 21"),
    ([["a", [["values", "I8", [21]]]], ["a", []]], "appears twice"),
    ([["a", [["values", "Q7", [28]]]]], "malformed part"),
    ([["a", [["values", "U8", [-28]]]]], "malformed part"),
    ([["a", [["values", "U8"]]]], "malformed part"),
    ({"a": []}, "must be a list of"),
    ([["a"]], "must be \\[layer name, parts\\]"),
])
def test_a_damaged_layout_is_refused_whole(tmp_path, listed, match):
    source, name = write(tmp_path, with_layout(listed))
    with pytest.raises(ArtifactError, match=match):
        layout(read_header(source, name), name)


def test_a_layout_that_is_not_base64_zstd_json_or_decompresses_without_bound_is_refused(tmp_path):
    packed = pack(LAYERS, "osd-fleet-delta/5")
    (length,) = struct.unpack("<Q", packed[:8])
    header = json.loads(packed[8:8 + length])
    bomb = zstandard.ZstdCompressor().compress(b" " * (MAX_BYTES + 1))
    for value in ("not base64!", base64.b64encode(b"not zstd").decode(), base64.b64encode(bomb).decode()):
        header["__metadata__"]["layout"] = value
        encoded = json.dumps(header).encode()
        source, name = write(tmp_path, struct.pack("<Q", len(encoded)) + encoded + packed[8 + length:])
        with pytest.raises(ArtifactError, match="unreadable payload layout"):
            layout(read_header(source, name), name)


def test_a_payload_of_the_older_layout_is_not_read_as_packed(tmp_path):
    from safetensors.torch import save

    source, name = write(tmp_path, save({"encoder.0.bias::values": torch.ones(2)}))
    with pytest.raises(ArtifactError, match="holds one uint8 tensor 'data'"):
        layout(read_header(source, name), name)
