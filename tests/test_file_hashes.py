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


def counting_reads(monkeypatch) -> list[Path]:
    """Every file ``file_hashes`` reads to hash, in order (the real reader still runs)."""
    reads: list[Path] = []
    real = file_hashes.sha256_file

    def counted(path: Path, *args) -> str:
        reads.append(path)
        return real(path, *args)

    monkeypatch.setattr(file_hashes, "sha256_file", counted)
    return reads


def test_a_hash_started_ahead_is_collected_not_read_again(tmp_path, cache, monkeypatch):
    reads = counting_reads(monkeypatch)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"ahead" * 1000)
    with file_hashes.hashing_ahead([shard, shard]):  # fresh, so never remembered on disk: only the thread answers
        assert file_hashes.remembered_sha256(shard) == hashlib.sha256(b"ahead" * 1000).hexdigest()
    assert reads == [shard.resolve()]
    assert records(cache) == []
    assert file_hashes.remembered_sha256(shard) == hashlib.sha256(b"ahead" * 1000).hexdigest()
    assert len(reads) == 2  # collected once; the next ask reads as before


def test_a_file_changed_after_its_hash_was_started_is_read_again(tmp_path, cache):
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"old" * 1000)
    with file_hashes.hashing_ahead([shard]):
        shard.write_bytes(b"new" * 1000)
        assert file_hashes.remembered_sha256(shard) == hashlib.sha256(b"new" * 1000).hexdigest()


def test_a_missing_file_is_skipped_ahead_and_reported_when_asked(tmp_path, cache):
    missing = tmp_path / "model.safetensors"
    with file_hashes.hashing_ahead([missing]), pytest.raises(FileNotFoundError):
        file_hashes.remembered_sha256(missing)


def test_a_read_error_on_the_thread_reaches_the_caller(tmp_path, cache, monkeypatch):
    def unreadable(path: Path, *args) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(file_hashes, "sha256_file", unreadable)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"z")
    with file_hashes.hashing_ahead([shard]), pytest.raises(PermissionError):
        file_hashes.remembered_sha256(shard)


def test_hashes_a_block_did_not_collect_are_dropped_when_it_ends(tmp_path, cache, monkeypatch):
    reads = counting_reads(monkeypatch)
    shards = [tmp_path / f"model-{i}.safetensors" for i in range(3)]
    for shard in shards:
        shard.write_bytes(shard.name.encode() * 1000)
    with file_hashes.hashing_ahead(shards):
        pass  # a command that failed before it needed a hash
    assert not file_hashes._ahead  # nothing left for a later command in this process to collect
    before = len(reads)
    assert file_hashes.remembered_sha256(shards[0]) == hashlib.sha256(shards[0].name.encode() * 1000).hexdigest()
    assert shards[0].resolve() in reads[before:]  # read by the caller itself (fresh files are never recorded)
