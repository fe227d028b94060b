"""JSON compressed with zstd and written as base64 text, for tables that sit inside a JSON or
safetensors header: a delta's per-tensor tables are 90% of its fixed bytes as plain JSON, and
compress about 15-fold because every entry repeats the same keys and names.

Decoding is bounded (``MAX_BYTES``) and refuses anything malformed with one message, so a damaged
or hostile table can neither exhaust memory nor be half-read.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import zstandard

from .errors import ArtifactError

MAX_BYTES = 64 * 1024 * 1024  # a 32-expert 70B model's tables are a few MB
ZSTD_LEVEL = 19  # the tables are KB to a few MB: the slowest level costs milliseconds


def encode(value: Any) -> str:
    """Canonical (sorted keys, compact) JSON of ``value``, compressed; the same value gives the same text."""
    raw = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
    return base64.b64encode(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)).decode()


def decode(text: object, where: object, what: str) -> Any:
    """The value ``encode`` wrote, or :class:`ArtifactError` naming ``where`` and ``what``."""
    try:
        if not isinstance(text, str):
            raise TypeError(f"expected base64 text, got {type(text).__name__}")
        compressed = base64.b64decode(text, validate=True)
        return json.loads(zstandard.ZstdDecompressor().decompress(compressed, max_output_size=MAX_BYTES))
    except (TypeError, binascii.Error, zstandard.ZstdError, UnicodeDecodeError, json.JSONDecodeError,
            RecursionError) as exc:
        raise ArtifactError(f"{where}: unreadable {what} ({type(exc).__name__}: {exc})") from None
