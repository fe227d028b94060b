"""URIs as osd-fleet takes them: a local path, ``file:///path`` or ``s3://bucket/key``.

Kept apart from ``osd_io.sources`` (which reads checkpoints, and so imports torch) so that parsing a
command line or a fleet file that names URIs stays fast.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

S3_SCHEME = "s3://"


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def local_path(uri: str) -> Path:
    """The local path of a plain path or ``file://`` URI (refuses ``s3://``)."""
    if is_s3(uri):
        raise ValueError(f"{uri} is not a local path")
    if uri.startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    return Path(uri).expanduser()


def join_uri(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}" if is_s3(uri) else str(local_path(uri) / name)

