"""A delta and a checkpoint are read only as written: a sealed manifest, typed fields, safe names, tiled bytes.

Every refusal is checked through the commands users run (``reconstruct`` and ``evaluate`` read a
delta; ``compress`` reads checkpoints), and every refusal leaves no output and writes nothing
outside the output directory.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from osd_cli.main import main
from osd_core.artifact import MANIFEST, DeltaArtifact
from osd_core.manifest import SEAL, pack_layers, seal, unpack_layers
from osd_core.byte_source import LocalDirectory
from osd_core.compress import compress_checkpoint
from osd_core.config import CompressionConfig
from osd_core.errors import ArtifactError, CheckpointError
from osd_core.safetensors_io import Header
from osd_core.safetensors_io import read_header as read_source_header


def read_header(path: Path) -> Header:
    """The header of one local safetensors file."""
    return read_source_header(LocalDirectory(path.parent), path.name)


@pytest.fixture
def delta(synthetic_pair: tuple[Path, Path], tmp_path: Path) -> Path:
    base, tuned = synthetic_pair
    compress_checkpoint(base, tuned, tmp_path / "delta", CompressionConfig(rank=1))
    return tmp_path / "delta"


def edit_manifest(delta: Path, change: Callable[[dict[str, Any]], None], *, reseal: bool) -> None:
    """Change the manifest as a hand edit would (``reseal=False``) or as a forger who recomputes the seal."""
    manifest = unpack_layers(json.loads((delta / MANIFEST).read_text()), delta)
    change(manifest)
    if reseal:
        (delta / MANIFEST).write_bytes(seal(pack_layers(manifest)))
    else:
        (delta / MANIFEST).write_text(json.dumps(pack_layers(manifest), indent=1, sort_keys=True) + "\n")


def first_factored(manifest: dict[str, Any]) -> dict[str, Any]:
    return next(info for info in manifest["layers"].values() if info["kind"] == "factored")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


HAND_EDITS = {
    "k changed": lambda m: first_factored(m).update(k=first_factored(m)["k"] + 1),
    "dtype changed": lambda m: first_factored(m).update(dtype="F16"),
    "seal removed": lambda m: m.pop(SEAL),
    "kind changed": lambda m: first_factored(m).update(kind="dense"),
}


@pytest.mark.parametrize("edit", list(HAND_EDITS))
@pytest.mark.parametrize("command", ["reconstruct", "evaluate"])
def test_a_hand_edited_manifest_is_refused_by_every_reader(capsys, synthetic_pair, delta, tmp_path, reliability,
                                                          edit, command):
    base, _ = synthetic_pair
    edit_manifest(delta, HAND_EDITS[edit], reseal=False)
    extra = ["--out", tmp_path / "restored"] if command == "reconstruct" else ["--data", tmp_path / "rows.jsonl"]
    code, err = run_cli(capsys, command, "--base", base, "--delta", delta, *extra)
    assert code == 2 and "Traceback" not in err
    assert "the manifest was changed after it was written" in err, err
    assert not (tmp_path / "restored").exists()
    reliability.refused(f"manifest hand-edited ({edit}), payload checksums untouched: {command}", err)


TYPE_ERRORS = {
    "shape a string": (lambda m: first_factored(m).update(shape="32x32"), "field 'shape' must be a list"),
    "k a float": (lambda m: first_factored(m).update(k=2.5), "field 'k' must be an integer >= 0"),
    "k a boolean": (lambda m: first_factored(m).update(k=True), "field 'k' must be an integer >= 0"),
    "bits negative": (lambda m: first_factored(m).update(paper_bits=-1), "field 'paper_bits' must be an integer"),
    "layers a list": (lambda m: m.update(layers=[]), "manifest field 'layers' is missing or not an object"),
    "version a string": (lambda m: m.update(format_version="3"), "format version '3' is not supported"),
    "payload bytes a string": (lambda m: next(iter(m["payloads"].values())).update(bytes="12"),
                               r"needs sha256 \(64 hex digits\) and bytes"),
    "base sha256 not hex": (lambda m: m["base"].update(sha256="z" * 64), "base.sha256 must be 64 hex digits"),
}


@pytest.mark.parametrize("case", list(TYPE_ERRORS))
def test_wrongly_typed_manifest_fields_are_refused_even_when_resealed(delta, reliability, case):
    change, message = TYPE_ERRORS[case]
    edit_manifest(delta, change, reseal=True)
    with pytest.raises(ArtifactError, match=message) as refused:
        DeltaArtifact.open(delta)
    reliability.refused(f"manifest field of the wrong type ({case})", str(refused.value))


@pytest.mark.parametrize("name", ["/etc/osd-fleet-escape", "../escape", "..", "sub/dir", ".hidden", "a\\b"])
def test_side_file_names_that_could_escape_are_refused_on_read(capsys, synthetic_pair, delta, tmp_path, reliability,
                                                              name):
    base, _ = synthetic_pair
    edit_manifest(delta, lambda m: m["files"].update({name: m["files"]["config.json"]}), reseal=True)
    code, err = run_cli(capsys, "reconstruct", "--base", base, "--delta", delta, "--out", tmp_path / "restored")
    assert code == 2 and "is not a plain file name" in err, err
    assert not (tmp_path / "restored").exists() and not Path("/etc/osd-fleet-escape").exists()
    assert not (tmp_path / "escape").exists()
    reliability.refused(f"manifest side-file name {name!r}", err)


@pytest.mark.parametrize("name", ["../payload-00000.safetensors", "/tmp/payload-x.safetensors", "model.bin"])
def test_payload_names_that_could_escape_are_refused_on_read(delta, reliability, name):
    def rename(manifest: dict[str, Any]) -> None:
        old = next(iter(manifest["payloads"]))
        manifest["payloads"][name] = manifest["payloads"].pop(old)
        for info in manifest["layers"].values():
            if info["file"] == old:
                info["file"] = name

    edit_manifest(delta, rename, reseal=True)
    with pytest.raises(ArtifactError, match="is not a plain file name") as refused:
        DeltaArtifact.open(delta)
    reliability.refused(f"manifest payload name {name!r}", str(refused.value))


def as_version(delta: Path, version: int) -> None:
    """Rewrite ``delta`` as the format before packed payloads wrote it: one tensor per part, named
    ``<tensor>::<part>``, and from version 3 a sealed manifest (version 2 had no seal). Version 5
    packed payloads as now; only mixed widths came later."""
    if version == 5:
        edit_manifest(delta, lambda m: m.update(format_version=5), reseal=True)
        return
    layers = list(DeltaArtifact.open(delta).layers())
    manifest = unpack_layers(json.loads((delta / MANIFEST).read_text()), delta)
    for name in manifest["payloads"]:
        tensors = {f"{layer.name}::{part}": tensor for layer in layers for part, tensor in layer.tensors.items()
                   if manifest["layers"][layer.name]["file"] == name}
        data = save(tensors, metadata={"format": f"osd-fleet-delta/{version}"})
        (delta / name).write_bytes(data)
        manifest["payloads"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["format_version"] = version
    manifest.pop(SEAL)
    edit_manifest(delta, lambda m: (m.clear(), m.update(manifest)), reseal=version >= 3)


@pytest.mark.parametrize("version", [2, 4, 5])
def test_deltas_of_earlier_versions_stay_readable(synthetic_pair, delta, tmp_path, version):
    base, _ = synthetic_pair
    assert main(["reconstruct", "--base", str(base), "--delta", str(delta), "--out", str(tmp_path / "now")]) == 0
    as_version(delta, version)
    assert DeltaArtifact.open(delta).manifest.format_version == version
    assert main(["reconstruct", "--base", str(base), "--delta", str(delta), "--out", str(tmp_path / "then")]) == 0
    now, then = load_file(tmp_path / "now" / "model.safetensors"), load_file(tmp_path / "then" / "model.safetensors")
    assert now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)


def write_raw_safetensors(path: Path, header: dict[str, Any], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32_2 = {"dtype": "F32", "shape": [2]}
BAD_HEADERS = {
    "overlapping tensors": ({"a": {**F32_2, "data_offsets": [0, 8]}, "b": {**F32_2, "data_offsets": [4, 12]}},
                            12, "overlaps the tensor before it"),
    "aliased tensors": ({"a": {**F32_2, "data_offsets": [0, 8]}, "b": {**F32_2, "data_offsets": [0, 8]}},
                        8, "overlaps the tensor before it"),
    "a gap between tensors": ({"a": {**F32_2, "data_offsets": [0, 8]}, "b": {**F32_2, "data_offsets": [12, 20]}},
                              20, "leaves a gap before it"),
    "offsets past the end": ({"a": {**F32_2, "data_offsets": [0, 8]}}, 4, "truncated"),
    "bytes after the last tensor": ({"a": {**F32_2, "data_offsets": [0, 8]}}, 16, "8 bytes follow the last tensor"),
    "non-string metadata": ({"__metadata__": {"format": 3}, "a": {**F32_2, "data_offsets": [0, 8]}}, 8,
                            "__metadata__ must map strings to strings"),
    "a float shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8,
                      "expected a list of integers"),
    "a boolean offset": ({"a": {**F32_2, "data_offsets": [False, 8]}}, 8, "expected \\[begin, end\\]"),
    "reversed offsets": ({"a": {**F32_2, "data_offsets": [8, 0]}}, 8, "expected \\[begin, end\\]"),
    "a dtype that is a list": ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, 8,
                               "unsupported dtype"),
    "an unknown field": ({"a": {**F32_2, "data_offsets": [0, 8], "strides": [1]}}, 8,
                         "needs exactly dtype, shape and data_offsets"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_safetensors_headers_the_reference_refuses_are_refused(tmp_path, reliability, case):
    header, data_bytes, message = BAD_HEADERS[case]
    path = write_raw_safetensors(tmp_path / "model.safetensors", header, bytes(data_bytes))
    with pytest.raises(CheckpointError, match=message) as refused:
        read_header(path)
    reliability.refused(f"safetensors header with {case}", str(refused.value))


def test_deeply_nested_json_is_refused_not_a_crash(capsys, synthetic_pair, delta, tmp_path, reliability):
    base, tuned = synthetic_pair
    deep = "[" * 100_000 + "]" * 100_000
    bad = tmp_path / "deep"
    bad.mkdir()
    (bad / "config.json").write_text((tuned / "config.json").read_text())
    raw = ('{"a": ' + deep + "}").encode()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    code, err = run_cli(capsys, "compress", "--base", base, "--finetuned", bad, "--out", tmp_path / "d")
    assert code == 2 and "nested too deeply" in err, err
    reliability.refused("safetensors header of deeply nested JSON", err)
    (delta / MANIFEST).write_text('{"layers": ' + deep + "}")
    code, err = run_cli(capsys, "reconstruct", "--base", base, "--delta", delta, "--out", tmp_path / "r")
    assert code == 2 and "nested too deeply" in err, err
    assert not (tmp_path / "r").exists()
    reliability.refused("delta manifest of deeply nested JSON", err)


def test_a_real_checkpoint_still_reads(real_pair):
    base, _ = real_pair
    header = read_header(base / "model.safetensors")
    assert len(header.tensors) > 50
    saved = Path(base).parent / "tiny.safetensors"
    save_file({"b": torch.zeros(3), "a": torch.ones(2, 2, dtype=torch.bfloat16)}, str(saved), metadata={"k": "v"})
    assert set(read_header(saved).tensors) == {"a", "b"} and read_header(saved).metadata == {"k": "v"}


def test_a_version_5_manifest_keeps_its_layer_table_packed_and_refuses_it_damaged(delta):
    stored = json.loads((delta / MANIFEST).read_text())
    assert "layers" not in stored and len((delta / MANIFEST).read_bytes()) < 6_000
    assert unpack_layers(stored, delta)["layers"].keys() == DeltaArtifact.open(delta).manifest.layers.keys()
    plain = {**unpack_layers(stored, delta)}
    plain.pop(SEAL)
    (delta / MANIFEST).write_bytes(seal(plain))  # a version-5 manifest written with a plain table
    with pytest.raises(ArtifactError, match="holds its layer table as 'layers_packed' and not as 'layers'"):
        DeltaArtifact.open(delta)
    damaged = {**stored, "layers_packed": stored["layers_packed"][:-8]}
    damaged.pop(SEAL)
    (delta / MANIFEST).write_bytes(seal(damaged))
    with pytest.raises(ArtifactError, match="unreadable manifest layer table"):
        DeltaArtifact.open(delta)
