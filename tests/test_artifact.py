"""The delta format refuses anything it did not write: versions, checksums, truncation, bit flips."""

import json
import math
import random
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from osd_core.artifact import DeltaArtifact, encode_payload
from osd_core.manifest import FORMAT_VERSION, pack_layers, unpack_layers
from osd_core.compress import compress_checkpoint
from osd_core.config import CompressionConfig
from osd_core.errors import ArtifactError, OSDError
from osd_core.layer import CompressedLayer
from osd_core.reconstruct import reconstruct_checkpoint


@pytest.fixture(params=[{}, {"value_dtype": "int8", "positions": "bitmap", "dense_dtype": "int8"}],
                ids=["paper", "int8-bitmap"])
def delta(synthetic_pair, tmp_path, request):
    """A delta in the paper's encoding (indices, float32) and in the packed one (bitmaps, int8,
    whole deltas in int8 too)."""
    base, tuned = synthetic_pair
    config = CompressionConfig(method="magtruncsvd", rank=1, extra_rank=2, **request.param)
    compress_checkpoint(base, tuned, tmp_path / "delta", config)
    return tmp_path / "delta"


def rewrite_manifest(path, change):
    manifest = unpack_layers(json.loads((path / "manifest.json").read_text()), path)
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(pack_layers(manifest)))


def test_manifest_records_provenance_and_checksums(delta):
    manifest = DeltaArtifact.open(delta).manifest
    assert manifest.to_json()["format"] == "osd-fleet-delta" and manifest.format_version == FORMAT_VERSION == 6
    assert manifest.config["method"] == "magtruncsvd" and manifest.osd_fleet_version
    assert len(manifest.base["sha256"]) == 64 and len(manifest.finetuned["sha256"]) == 64
    assert all(len(info.sha256) == 64 for info in manifest.payloads.values())
    assert "config.json" in manifest.files
    assert (delta / "manifest.json").read_bytes() == manifest.to_bytes()  # the record round-trips exactly


def test_newer_format_version_is_refused(delta):
    rewrite_manifest(delta, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        DeltaArtifact.open(delta)


def test_foreign_manifest_is_refused(delta):
    rewrite_manifest(delta, lambda m: m.update(format="something-else"))
    with pytest.raises(ArtifactError, match="not an osd-fleet delta manifest"):
        DeltaArtifact.open(delta)


def test_payload_checksum_mismatch_is_refused(delta):
    payload = next(delta.glob("payload-*.safetensors"))
    data = bytearray(payload.read_bytes())
    data[-1] ^= 0x01
    payload.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        DeltaArtifact.open(delta)


def test_missing_payload_is_refused(delta):
    next(delta.glob("payload-*.safetensors")).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        DeltaArtifact.open(delta)


def test_directory_without_manifest_is_not_a_delta(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        DeltaArtifact.open(tmp_path)


def test_reconstruct_refuses_a_corrupt_delta_and_writes_nothing(synthetic_pair, delta, tmp_path):
    base, _ = synthetic_pair
    (delta / "files" / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        reconstruct_checkpoint(base, delta, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".restored")]


def test_out_of_range_positions_in_a_payload_never_become_weights():
    layer = CompressedLayer("w", "sparse", (4, 4), {"index": torch.tensor([3, 99], dtype=torch.int16),
                                                    "values": torch.ones(2)})
    with pytest.raises(ArtifactError, match="position out of range"):
        layer.delta()


def test_payload_names_cannot_escape_the_delta():
    with pytest.raises(ArtifactError, match="payload name"):
        encode_payload("../evil.safetensors", [])


def test_fuzzed_artifacts_fail_cleanly_or_reconstruct_exactly(synthetic_pair, delta, tmp_path, reliability):
    """Random truncations and bit flips anywhere: always an OSDError, never different weights."""
    started = time.monotonic()
    base, _ = synthetic_pair
    reference = reconstruct_checkpoint(base, delta, tmp_path / "reference") / "model.safetensors"
    files = sorted(p for p in delta.rglob("*") if p.is_file())
    rng = random.Random(1234)
    outcomes = {"refused": 0, "identical": 0, "wrong": 0}
    for trial in range(60):
        copy = tmp_path / f"fuzz{trial}"
        shutil.copytree(delta, copy)
        target = copy / rng.choice(files).relative_to(delta)
        data = bytearray(target.read_bytes())
        if rng.random() < 0.5 and len(data) > 1:
            data = data[: rng.randrange(len(data))]
        else:
            position = rng.randrange(len(data))
            data[position] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
        try:
            restored = reconstruct_checkpoint(base, copy, tmp_path / f"out{trial}")
        except OSDError:
            outcomes["refused"] += 1
            continue
        same = (restored / "model.safetensors").read_bytes() == reference.read_bytes()
        outcomes["identical" if same else "wrong"] += 1
        shutil.rmtree(copy)
    reliability.fault(
        "delta fuzzed: a random truncation or bit flip in one of its files",
        tried=60,
        survived=outcomes["refused"] + outcomes["identical"],
        checked=f"{outcomes['refused']} refused with a clean error, {outcomes['identical']} rebuilt identical weights "
        f"(a flip the format ignores), {outcomes['wrong']} rebuilt different weights",
        seconds=time.monotonic() - started,
    )
    assert outcomes["wrong"] == 0 and outcomes["refused"] >= 50  # manifest whitespace flips may change nothing


def test_manifest_pinned_by_its_catalog_checksum(delta):
    import hashlib

    good = hashlib.sha256((delta / "manifest.json").read_bytes()).hexdigest()
    assert DeltaArtifact.open(delta, expected_sha256=good)
    rewrite_manifest(delta, lambda m: m["layers"]["classifier.weight"].update(rel_error=0.5))
    with pytest.raises(ArtifactError, match="differs from the catalog's"):
        DeltaArtifact.open(delta, expected_sha256=good)


def test_a_layer_with_new_rows_needs_exactly_their_values():
    rows = {"values": torch.zeros(4, dtype=torch.float16)}  # the 2 × 2 rows both share
    layer = CompressedLayer("embed", "dense", (3, 2), {**rows, "rows.values": torch.ones(2, dtype=torch.float16)},
                            new_rows=1)
    assert layer.shared_shape == (2, 2) and layer.appended_rows().tolist() == [[1.0, 1.0]]
    with pytest.raises(ArtifactError, match="1 new rows need a float vector 'rows.values' of 2 values"):
        CompressedLayer("embed", "dense", (3, 2), {**rows, "rows.values": torch.ones(3)}, new_rows=1)
    with pytest.raises(ArtifactError, match="cannot have 3 new rows"):
        CompressedLayer("embed", "dense", (3, 2), {**rows, "rows.values": torch.ones(6)}, new_rows=3)
    with pytest.raises(ArtifactError, match="unexpected payload tensors"):  # no new rows declared
        CompressedLayer("embed", "dense", (2, 2), {"values": torch.zeros(4), "rows.values": torch.ones(2)})


def test_an_experts_layer_refuses_parts_outside_its_slices():
    sparse = {"e0.values": torch.ones(1), "e0.index": torch.tensor([3], dtype=torch.int16)}
    layer = CompressedLayer("experts", "experts", (2, 2, 2), sparse)
    assert [part.kind for part in layer.slices()] == ["sparse", "zero"]
    assert layer.delta().tolist() == [[[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]]
    with pytest.raises(ArtifactError, match="parts outside its 2 slices"):
        CompressedLayer("experts", "experts", (2, 2, 2), {**sparse, "e2.values": torch.ones(1)})
    with pytest.raises(ArtifactError, match="an experts layer is 3-D"):
        CompressedLayer("experts", "experts", (2, 2), {})


def test_a_dense_int8_layer_is_its_values_times_one_scale():
    values = torch.tensor([-127, 0, 64, 127], dtype=torch.int8)
    layer = CompressedLayer("bias", "dense", (4,), {"values": values, "scale": torch.tensor([0.5])})
    assert layer.delta().tolist() == [-63.5, 0.0, 32.0, 63.5] and layer.nbytes == 4 + 4
    for tensors, match in (
        ({"values": values}, "int4 with a float32 'scale' of shape"),
        ({"values": values, "scale": torch.tensor([0.5, 0.5])}, "int4 with a float32 'scale' of shape"),
        ({"values": values, "scale": torch.tensor([1], dtype=torch.float16)}, "float32 'scale'"),
        ({"values": values.float(), "scale": torch.tensor([0.5])}, "unexpected payload tensors"),
        ({"values": values[:3], "scale": torch.tensor([0.5])}, "needs 4 values"),
    ):
        with pytest.raises(ArtifactError, match=match):
            CompressedLayer("bias", "dense", (4,), tensors)
    with pytest.raises(ArtifactError, match="replace values of dtype torch.int8 need a float type"):
        CompressedLayer("head", "replace", (4,), {"values": values, "scale": torch.tensor([0.5])})
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        CompressedLayer("bias", "dense", (4,), {"values": values, "scale": torch.tensor([float("nan")])}).delta()


def test_a_dense_int4_layer_unpacks_two_values_a_byte():
    packed = torch.tensor([0x81, 0x0F], dtype=torch.uint8)  # nibbles 1, 8, 15 and padding: -7, 0, 7
    layer = CompressedLayer("bias", "dense", (3,), {"values": packed, "scale": torch.tensor([0.5])})
    assert layer.delta().tolist() == [-3.5, 0.0, 3.5] and layer.nbytes == 2 + 4
    for values, match in ((packed[:1], "must be 2 bytes for 3 entries"),
                          (torch.tensor([0x80, 0x0F], dtype=torch.uint8), "zero field or non-zero padding"),
                          (torch.tensor([0x81, 0xFF], dtype=torch.uint8), "zero field or non-zero padding")):
        with pytest.raises(ArtifactError, match=match):
            CompressedLayer("bias", "dense", (3,), {"values": values, "scale": torch.tensor([0.5])})
    with pytest.raises(ArtifactError, match="packed int4 with a float32 'scale'"):
        CompressedLayer("bias", "dense", (3,), {"values": packed})


@pytest.mark.parametrize("dtype,levels,entry_bytes", [("int8", 127, 1), ("int4", 7, 0.5)])
def test_whole_deltas_in_integers_are_within_half_a_step_and_smaller(synthetic_pair, tmp_path, dtype, levels,
                                                                     entry_bytes):
    base, tuned = synthetic_pair
    whole = {}
    for dense_dtype in ("float16", dtype):
        compress_checkpoint(base, tuned, tmp_path / dense_dtype, CompressionConfig(rank=1, dense_dtype=dense_dtype))
        whole[dense_dtype] = sum(layer.nbytes for layer in DeltaArtifact.open(tmp_path / dense_dtype).layers()
                                 if layer.kind == "dense")
    layers = {layer.name: layer for layer in DeltaArtifact.open(tmp_path / dtype).layers()}
    dense = [layer for layer in layers.values() if layer.kind == "dense"]
    stored = torch.int8 if dtype == "int8" else torch.uint8
    assert dense and all(layer.tensors["values"].dtype == stored for layer in dense)
    entries = [math.prod(layer.shape) for layer in dense]
    assert whole["float16"] == 2 * sum(entries)
    assert whole[dtype] == sum(math.ceil(n * entry_bytes) for n in entries) + 4 * len(dense)  # one scale each
    base_tensors, tuned_tensors = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for layer in dense:
        exact = tuned_tensors[layer.name].float() - base_tensors[layer.name].float()
        step = float(layer.tensors["scale"])
        assert step == pytest.approx(float(exact.abs().max()) / levels)
        assert float((layer.delta() - exact).abs().max()) <= step / 2 * (1 + 1e-5)
    head = [layer for layer in layers.values() if layer.kind == "replace"]
    assert all(layer.tensors["values"].dtype == torch.float16 for layer in head)  # a new head is not a delta
