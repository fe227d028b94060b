"""Run ``osd-fleet`` and SIGKILL this process at the N-th publish of a manifest or a catalog part.

A fault test's child: ``python -m tests.killed_flow manifest|catalog N CLI-ARGS...``. The local
store writes every object to a temporary file, fsyncs it, then publishes it with one rename
(``os.replace``) or, for conditional writes such as catalog parts, one ``os.link``. Killing the
process just before the N-th publish of a ``manifest.json`` leaves that delta's payloads stored
but uncommitted; before the N-th catalog part, a committed delta whose row was written to a
temporary file and never published. SIGKILL runs no ``finally`` and no atexit handler, so what
the store holds afterwards is exactly what a crash there leaves.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

POINTS = {"manifest": "manifest.json", "catalog": "/catalog/parts/"}


def kill_at(point: str, nth: int) -> None:
    """Make the ``nth`` publish of a file matching ``point`` kill this process instead."""
    marker, seen = POINTS[point], [0]

    def guard(publish: Callable[..., Any]) -> Callable[..., Any]:
        def run(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if marker in str(dst):
                seen[0] += 1
                if seen[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return publish(src, dst, *args, **kwargs)

        return run

    os.replace = guard(os.replace)
    os.link = guard(os.link)


def main(argv: list[str]) -> int:
    point, nth, *cli = argv
    kill_at(point, int(nth))
    from osd_cli.main import main as osd_fleet

    return osd_fleet(cli)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
