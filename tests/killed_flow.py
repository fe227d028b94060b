"""Run ``osd-fleet`` and SIGKILL this process at the N-th publish of a manifest or catalog commit.

A fault test's child: ``python -m tests.killed_flow manifest|catalog N CLI-ARGS...``. The local
store writes every object to a temporary file, fsyncs it, then publishes it with one rename
(``os.replace``) or one ``os.link``. Killing the process just before the N-th publish of a
``manifest.json`` leaves that delta's payloads stored but uncommitted. The catalog's commits are
made by delta-rs, in Rust, out of Python's reach, so the ``catalog`` point kills as the N-th
Delta merge starts: a committed delta whose row was never committed. (A crash inside the commit
leaves data files no log entry names; ``test_catalog`` checks that readers ignore them.)
SIGKILL runs no ``finally`` and no atexit handler, so what the store holds afterwards is exactly
what a crash there leaves.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

def kill_at(point: str, nth: int) -> None:
    """Make the ``nth`` manifest publish (or catalog merge) kill this process instead."""
    seen = [0]

    def guard(publish: Callable[..., Any], marker: str | None = None) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            if marker is None or marker in str(args[1]):
                seen[0] += 1
                if seen[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return publish(*args, **kwargs)

        return run

    if point == "manifest":
        os.replace = guard(os.replace, "manifest.json")
        os.link = guard(os.link, "manifest.json")
    elif point == "catalog":
        from deltalake.table import TableMerger

        TableMerger.execute = guard(TableMerger.execute)
    else:
        raise SystemExit(f"unknown kill point {point!r}: manifest or catalog")


def main(argv: list[str]) -> int:
    point, nth, *cli = argv
    kill_at(point, int(nth))
    from osd_cli.main import main as osd_fleet

    return osd_fleet(cli)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
