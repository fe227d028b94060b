"""Byte sources: the one interface every checkpoint, payload and calibration read goes through.

A source is a flat directory of named files read by byte range: a local directory here, an
object-store prefix in ``osd_io.sources``. Safetensors headers and tensors are read through it,
so planning, the single-process path and the Ray workers share one reader, and a tensor read
from S3 and one read from disk take the same checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from .file_hashes import remembered_sha256


@runtime_checkable
class ByteSource(Protocol):
    """A directory of files, read by name and byte range; nothing here writes."""

    @property
    def location(self) -> str:
        """Where the files are, for messages: a directory path or an ``s3://`` prefix."""

    @property
    def canonical(self) -> str:
        """A stable name for provenance: an absolute path, or the ``s3://`` prefix."""

    def list(self) -> dict[str, int]:
        """The top-level files and their sizes in bytes, sorted by name."""

    def size(self, name: str) -> int:
        """The size of file ``name`` in bytes (raises ``FileNotFoundError`` when absent)."""

    def read_range(self, name: str, start: int, into: memoryview) -> int:
        """Fill ``into`` from byte ``start`` of file ``name``; returns the bytes read (fewer at the end)."""

    def sha256(self, name: str) -> str:
        """The SHA-256 of file ``name``: recorded where the store keeps one, else read in chunks."""


def where(source: ByteSource, name: str) -> str:
    """``name`` inside ``source``, as messages print it."""
    return f"{source.location.rstrip('/')}/{name}"


def read_bytes(source: ByteSource, name: str, start: int = 0, length: int | None = None) -> bytes:
    """``length`` bytes of ``name`` from ``start`` (to the end when None), as one read."""
    if length is None:
        length = max(0, source.size(name) - start)
    buffer = bytearray(length)
    got = source.read_range(name, start, memoryview(buffer)) if length else 0
    return bytes(buffer[:got])


class LocalDirectory:
    """A local directory as a byte source; reads go straight into the caller's buffer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"LocalDirectory({str(self.path)!r})"

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def canonical(self) -> str:
        return str(self.path.resolve())

    def list(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in sorted(self.path.iterdir()) if p.is_file()}

    def size(self, name: str) -> int:
        return (self.path / name).stat().st_size

    def read_range(self, name: str, start: int, into: memoryview) -> int:
        with (self.path / name).open("rb") as handle:
            handle.seek(start)
            return handle.readinto(into) or 0

    def sha256(self, name: str) -> str:
        """Read once per version of the file: a fleet's base is hashed once (``file_hashes``)."""
        return remembered_sha256(self.path / name)
