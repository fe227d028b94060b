"""osd-fleet's cache directory, and small JSON records kept in it by content key.

Why: some answers cost seconds to compute and never change for the same inputs. Deriving a
model's tensor roles imports transformers and builds the model on the meta device, about 4 s,
while a fleet compresses hundreds of fine-tunes of one architecture. A record is keyed by a hash
of everything its answer depends on, written atomically, and ignored (recomputed) when it cannot
be read: the cache can be deleted at any time and only costs the recomputation.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """``$OSD_FLEET_CACHE`` or ``~/.cache/osd-fleet`` (shared with the workloads cache)."""
    return Path(os.environ.get("OSD_FLEET_CACHE") or Path.home() / ".cache" / "osd-fleet")


def load_record(kind: str, key: str) -> dict[str, Any] | None:
    """The record ``kind``/``key``, or None when absent or unreadable."""
    try:
        data = json.loads((cache_root() / kind / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def store_record(kind: str, key: str, data: dict[str, Any]) -> None:
    """Write the record atomically; a cache that cannot be written is skipped, never an error."""
    directory = cache_root() / kind
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{key}.", suffix=".partial", dir=directory)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(data, out, sort_keys=True)
            os.replace(temporary, directory / f"{key}.json")
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError:
        pass
