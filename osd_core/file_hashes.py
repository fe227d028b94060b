"""SHA-256 of local checkpoint shards, remembered while a shard's stat says it is unchanged.

Why: a fleet compresses hundreds of fine-tunes of one base, often each at several budgets, and
every run records both checkpoints' content hashes. A 7B base is 13.5 GB, about 12 s of a core
to hash, and on a small machine that core is taken from the SVDs (``bench/scale.py``). git's
index makes the same trade: a file whose stat is unchanged is trusted unchanged. The key holds the
device, inode, size, mtime and ctime; any write or rename changes ctime, which no user call can set
back. A file written in the last ``SETTLE_SECONDS`` is hashed but not remembered, since a second
write within one timestamp tick would not change its stat (git's "racily clean" entries), and nor
is a file whose stat changed while it was read.

This is provenance, not integrity: bit rot does not change a stat. Payloads a delta lists are
always read again (``artifact``), and the records can be deleted at any time (``disk_cache``).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from . import disk_cache

HASH_CHUNK_BYTES = 8 * 1024 * 1024
SETTLE_SECONDS = 1.0
KIND = "sha256"


def sha256_file(path: Path, chunk: int = HASH_CHUNK_BYTES) -> str:
    """The SHA-256 of ``path``, read in chunks: every byte, every time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remembered_sha256(path: Path) -> str:
    """The SHA-256 of ``path``, from the cache while its stat is the one recorded, else read."""
    resolved = path.resolve()
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:32]
    before = _stat(resolved)
    record = disk_cache.load_record(KIND, key)
    if record is not None and record.get("path") == str(resolved) and record.get("stat") == before:
        digest = record.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    digest = sha256_file(resolved)
    settled = time.time_ns() - before[4] > SETTLE_SECONDS * 1e9
    if settled and _stat(resolved) == before:
        disk_cache.store_record(KIND, key, {"path": str(resolved), "stat": before, "sha256": digest})
    return digest


def _stat(path: Path) -> list[int]:
    """What a write, truncation or replacement of ``path`` changes: device, inode, size, mtime, ctime."""
    info = os.stat(path)
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]
