"""Names and object keys that cannot escape the store's prefix.

Model names and revisions end up inside object keys and file paths. Rather than escaping
them, we accept only a small alphabet (letters, digits, ``.``, ``_``, ``-``), so a key built
from safe parts can never contain ``/``, ``..``, a drive letter, a NUL byte or anything an
S3 console or a shell would interpret. Names starting with ``.`` are refused too: the local
backend uses dot-files for its temporary files, so no key can ever collide with one.

The rules are checked here, once, and every storage call goes through :func:`check_key`.
"""

from __future__ import annotations

import re

from osd_core.errors import OSDError

__all__ = [
    "InvalidNameError",
    "MAX_KEY_LENGTH",
    "MAX_NAME_LENGTH",
    "check_key",
    "check_prefix",
    "join_key",
    "safe_name",
]

MAX_NAME_LENGTH = 128
# S3 limits keys to 1024 bytes; keep headroom for the store's own prefix.
MAX_KEY_LENGTH = 768

_SAFE = re.compile(r"[A-Za-z0-9._-]+")


class InvalidNameError(OSDError, ValueError):
    """A name or key that could escape the prefix or is not portable; the message names it."""


def safe_name(name: str) -> str:
    """Return ``name`` unchanged if it is safe as one key segment, else raise InvalidNameError.

    Safe: 1 to 128 characters from ``[A-Za-z0-9._-]``, not starting with ``.``, no ``..``.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"name must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise InvalidNameError("name must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"name must be at most {MAX_NAME_LENGTH} characters, got {len(name)}: {name[:40]!r}..."
        )
    if not _SAFE.fullmatch(name):
        bad = sorted({ch for ch in name if not _SAFE.fullmatch(ch)})
        raise InvalidNameError(
            f"name {name!r} contains characters outside [A-Za-z0-9._-]: {''.join(bad)!r}"
        )
    if name.startswith("."):
        raise InvalidNameError(f"name {name!r} must not start with '.'")
    if ".." in name:
        raise InvalidNameError(f"name {name!r} must not contain '..'")
    return name


def join_key(*parts: str) -> str:
    """Join safe segments with ``/``; every part must pass :func:`safe_name` on its own.

    Parts containing ``/`` are refused rather than split, so ``join_key("a/../b")`` fails and
    the caller has to say which segments it means.
    """
    if not parts:
        raise InvalidNameError("a key needs at least one part")
    key = "/".join(safe_name(p) for p in parts)
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidNameError(f"key must be at most {MAX_KEY_LENGTH} characters, got {len(key)}")
    return key


def check_key(key: str) -> str:
    """Validate a ``/``-separated relative key (as passed to the stores) and return it.

    Refuses absolute keys (``/x``), empty segments (``a//b``, trailing ``/``) and any unsafe
    segment, which covers ``..`` and odd characters.
    """
    if not isinstance(key, str):
        raise InvalidNameError(f"key must be a str, got {type(key).__name__}: {key!r}")
    if key.startswith("/"):
        raise InvalidNameError(f"key {key!r} must be relative (no leading '/')")
    try:
        return join_key(*key.split("/"))
    except InvalidNameError as exc:
        raise InvalidNameError(f"invalid key {key!r}: {exc}") from None


def check_prefix(prefix: str) -> str:
    """Validate a listing prefix: ``""``, ``"a/b/"`` or a partial last segment like ``"a/b"``."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix
