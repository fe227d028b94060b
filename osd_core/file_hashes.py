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

:func:`hashing_ahead` starts the same work on a background thread before the caller needs it:
``osd-fleet compress`` spends its first seconds importing torch on one core, and a hash read
then is one the SVDs do not have to share their cores with later.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from . import disk_cache

HASH_CHUNK_BYTES = 8 * 1024 * 1024
SETTLE_SECONDS = 1.0
KIND = "sha256"

_ahead: dict[tuple[str, tuple[int, ...]], Future[str]] = {}
_ahead_lock = threading.Lock()


def sha256_file(path: Path, chunk: int = HASH_CHUNK_BYTES) -> str:
    """The SHA-256 of ``path``, read in chunks: every byte, every time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remembered_sha256(path: Path) -> str:
    """The SHA-256 of ``path``, from the cache while its stat is the one recorded, else read.

    A hash :func:`hashing_ahead` started for this version of the file is waited for, not repeated.
    """
    resolved = path.resolve()
    before = _stat(resolved)
    with _ahead_lock:
        started = _ahead.pop((str(resolved), tuple(before)), None)
    if started is not None:
        return started.result()
    return _remembered(resolved, before)


@contextmanager
def hashing_ahead(paths: Iterable[Path]) -> Iterator[None]:
    """Hash ``paths``, in order, on one background thread while the block runs; :func:`remembered_sha256` collects.

    The thread is a daemon, so a command that fails before it needs a hash exits at once instead
    of waiting for gigabytes to be read, and hashes the block did not collect are cancelled when it
    ends, so a later caller in the same process reads for itself. A file that changes before its
    hash is asked for has another stat, so it is read again then; a missing one is skipped here and
    reported there.
    """
    jobs: dict[tuple[str, tuple[int, ...]], tuple[Path, list[int], Future[str]]] = {}
    with _ahead_lock:
        for path in paths:
            resolved = path.resolve()
            try:
                before = _stat(resolved)
            except OSError:
                continue
            key = (str(resolved), tuple(before))
            if key not in _ahead:
                _ahead[key] = Future()
                jobs[key] = (resolved, before, _ahead[key])
    if jobs:
        threading.Thread(target=_hash_all, args=(list(jobs.values()),), name="osd-hash-ahead", daemon=True).start()
    try:
        yield
    finally:
        with _ahead_lock:
            for key, (_, _, result) in jobs.items():
                if _ahead.get(key) is result:
                    del _ahead[key]
                result.cancel()


def _hash_all(jobs: list[tuple[Path, list[int], Future[str]]]) -> None:
    for resolved, before, result in jobs:
        if not result.set_running_or_notify_cancel():
            continue
        try:
            result.set_result(_remembered(resolved, before))
        except Exception as exc:  # handed to the caller of remembered_sha256, which raises it
            result.set_exception(exc)


def _remembered(resolved: Path, before: list[int]) -> str:
    """The recorded hash of ``resolved`` if its stat is still ``before``, else read (and recorded once settled)."""
    key = hashlib.sha256(str(resolved).encode()).hexdigest()[:32]
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
