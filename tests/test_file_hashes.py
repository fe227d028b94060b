"""Shard hashes are remembered while the shard is unchanged, and only then (``osd_core.file_hashes``)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from osd_core import file_hashes
from osd_core.checkpoint import Checkpoint


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("OSD_FLEET_CACHE", str(root))
    return root / file_hashes.KIND


def records(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.json")) if cache.exists() else []


def test_a_settled_file_is_read_once_and_a_rewrite_with_its_old_mtime_is_read_again(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(file_hashes, "SETTLE_SECONDS", 0.0)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"a" * 1000)
    assert file_hashes.remembered_sha256(shard) == hashlib.sha256(b"a" * 1000).hexdigest()
    [record] = records(cache)
    # A record the reader trusts: replacing its digest shows the second call does not read the file.
    data = json.loads(record.read_text())
    record.write_text(json.dumps({**data, "sha256": "f" * 64}))
    assert file_hashes.remembered_sha256(shard) == "f" * 64
    # Same size, same mtime, other bytes: the ctime moved, so the file is read again.
    stat = shard.stat()
    shard.write_bytes(b"b" * 1000)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_mtime_ns == stat.st_mtime_ns
    assert file_hashes.remembered_sha256(shard) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_a_file_written_within_the_settle_time_is_hashed_but_not_remembered(tmp_path, cache):
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"fresh")
    assert file_hashes.remembered_sha256(shard) == hashlib.sha256(b"fresh").hexdigest()
    assert records(cache) == []


def test_a_damaged_record_is_ignored(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(file_hashes, "SETTLE_SECONDS", 0.0)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"x" * 10)
    file_hashes.remembered_sha256(shard)
    [record] = records(cache)
    record.write_text('{"path": 1, "sta')
    assert file_hashes.remembered_sha256(shard) == hashlib.sha256(b"x" * 10).hexdigest()


def test_a_checkpoints_identity_is_the_same_from_a_cold_and_a_warm_cache(real_pair, cache, monkeypatch):
    monkeypatch.setattr(file_hashes, "SETTLE_SECONDS", 0.0)
    base = Checkpoint.open(real_pair[0])
    cold = base.identity()
    assert len(records(cache)) == len(base.shards)
    assert Checkpoint.open(real_pair[0]).identity() == cold
    digest = hashlib.sha256()
    for shard in sorted(base.shards):
        digest.update(shard.encode())
        digest.update(file_hashes.sha256_file(Path(real_pair[0]) / shard).encode())
    assert cold["sha256"] == digest.hexdigest()
