"""Property-based fuzzing of the two formats osd-fleet reads from untrusted places.

* A safetensors header, whatever its JSON, is either refused with :class:`CheckpointError` or
  describes tensors whose byte ranges tile the data section exactly, each the size its dtype and
  shape need. No other exception escapes.
* A delta manifest changed anywhere, by any JSON value, is refused with :class:`ArtifactError`
  unless the change is a no-op. Resealed (a forger who recomputes the digest), it is either
  refused or decodes with only :class:`OSDError` failures: never a crash, never a file outside
  the output.

The examples are derived with a fixed seed (``derandomize``) so CI runs the same cases each time.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osd_core.artifact import MANIFEST, DeltaArtifact
from osd_core.manifest import Manifest, seal
from osd_core.compress import compress_checkpoint
from osd_core.config import CompressionConfig
from osd_core.errors import ArtifactError, CheckpointError, OSDError
from osd_core.reconstruct import reconstruct_checkpoint
from osd_core.safetensors_io import DTYPES, parse_header

FUZZ = settings(max_examples=300, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                | st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
offsets = st.integers(0, 64)
tensor_specs = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPES, "F8", 3]),
    "shape": st.lists(st.integers(-1, 4), max_size=3) | json_values,
    "data_offsets": st.lists(offsets, min_size=2, max_size=2) | json_values,
}) | json_values
headers = st.dictionaries(st.text(max_size=4), tensor_specs, max_size=4) | json_values


@FUZZ
@given(header=headers, data_bytes=st.integers(0, 80))
def test_any_safetensors_header_is_refused_or_tiles_its_data(reliability, header: Any, data_bytes: int) -> None:
    raw = json.dumps(header).encode()
    size = 8 + len(raw) + data_bytes
    reliability.fault("safetensors header fuzzed (hypothesis: any JSON, any data length)", tried=1, survived=1,
                      checked="refused with CheckpointError, or its tensors tile the data exactly; nothing else "
                              "escapes", seconds=0)
    try:
        parsed = parse_header(struct.pack("<Q", len(raw)), raw, "fuzz.safetensors", size)
    except CheckpointError:
        return
    position = 8 + len(raw)
    for entry in sorted(parsed.tensors.values(), key=lambda e: e.start):
        assert entry.start == position
        assert entry.end - entry.start == entry.numel * DTYPES[entry.dtype].itemsize
        position = entry.end
    assert position == size


@pytest.fixture(scope="module")
def sealed_delta(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes]:
    from tests.conftest import write_bert_like

    root = tmp_path_factory.mktemp("fuzz")
    state = write_bert_like(root / "base", layers=1, hidden=16, intermediate=32, vocab=20, seed=0)
    write_bert_like(root / "ft", layers=1, hidden=16, intermediate=32, vocab=20, seed=1, base=state)
    compress_checkpoint(root / "base", root / "ft", root / "delta", CompressionConfig(rank=1))
    return root / "base", root / "delta", (root / "delta" / MANIFEST).read_bytes()


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths(inner, (*prefix, index))
    return found


def replaced(manifest: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(manifest)
    holder = changed
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = value
    return changed


@FUZZ
@given(data=st.data())
def test_any_change_to_a_manifest_is_refused_unless_resealed(sealed_delta, tmp_path_factory, reliability,
                                                            data) -> None:
    base, delta, raw = sealed_delta
    reliability.fault("manifest changed at a random place to a random JSON value (hypothesis)", tried=1, survived=1,
                      checked="refused unless a no-op; resealed, refused or rebuilt with only OSDError failures "
                              "and no partial output", seconds=0)
    manifest = json.loads(raw)
    path = data.draw(st.sampled_from(paths(manifest)), label="path")
    value = data.draw(json_values, label="value")
    changed = replaced(manifest, path, value)
    unsealed = (json.dumps(changed, indent=1, sort_keys=True) + "\n").encode()
    if unsealed == (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode():  # True == 1, not "1"
        Manifest.parse(unsealed, "fuzz")
        return
    with pytest.raises(ArtifactError):
        Manifest.parse(unsealed, "fuzz")
    forged = tmp_path_factory.mktemp("forged")
    for item in delta.rglob("*"):
        target = forged / item.relative_to(delta)
        if item.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.read_bytes())
    (forged / MANIFEST).write_bytes(seal(changed))
    out = forged.parent / f"{forged.name}-restored"
    try:
        DeltaArtifact.open(forged)
        reconstruct_checkpoint(base, forged, out, check_base=False)
    except OSDError:
        assert not out.exists()
    assert not list(forged.parent.glob(f".{out.name}*"))  # no partial output left beside it
