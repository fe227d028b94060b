"""The ``osd-fleet`` entry point: the parser of every command, and the one error boundary.

One error boundary, in :func:`main`: every failure a user can fix (an :class:`OSDError` from any
layer, or an ``OSError`` such as a full disk or a read-only file system) prints one line naming the
problem and exits with status 2; no traceback. Anything else is a bug in osd-fleet: one line and
exit 1, or its traceback with ``--verbose``. SIGTERM (what schedulers and Kubernetes send) unwinds
like Ctrl-C, so partial outputs and scratch directories are removed on the way out. Progress bars
go to stderr so ``--json`` output on stdout stays parseable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

from osd_cli.delta_commands import add_delta_commands
from osd_cli.fleet import add_fleet_commands
from osd_core import __version__
from osd_core.errors import OSDError

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that ``finally`` blocks and context managers run."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.handler(args)
    except (OSDError, OSError) as exc:
        print(f"osd-fleet: error: {describe(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("osd-fleet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("osd-fleet: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:
        if args.verbose:
            raise
        print(f"osd-fleet: internal error (a bug in osd-fleet): {type(exc).__name__}: {exc}; rerun as "
              "`osd-fleet --verbose ...` for the traceback", file=sys.stderr)
        return EXIT_BUG
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe(exc: BaseException) -> str:
    """One line for an expected failure; an ``OSError`` names its file and the system's reason."""
    if isinstance(exc, OSError) and not isinstance(exc, OSDError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror}"
    return str(exc)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osd-fleet", description="Store fine-tunes as compressed weight deltas.")
    parser.add_argument("--version", action="version", version=f"osd-fleet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    commands = parser.add_subparsers(dest="command", required=True)

    add_delta_commands(commands)
    add_fleet_commands(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
