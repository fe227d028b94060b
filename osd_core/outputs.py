"""Output directories: created exclusively, replaced only when ours, never an input.

Every directory osd-fleet writes (a delta, a restored checkpoint) follows one rule:

* The target may not be, contain, or lie inside an input: ``--out`` naming the fine-tune would
  otherwise replace the very checkpoint being compressed.
* An existing non-empty target is replaced only with ``overwrite`` *and* when it is recognisably
  ours (a delta's ``manifest.json``, or the marker a restored checkpoint carries). A folder of
  someone's files is never deleted, whatever the flags say.
* Work goes into a hidden sibling named after this host and process, and is published by a
  rename that fails when another run published first, so of two runs started at once with the
  same target exactly one wins and the other fails cleanly. With ``overwrite`` (asked for
  explicitly) the old target, checked again to be ours, is moved aside first and deleted only
  once the new one is in place, with SIGINT and SIGTERM held off for those two renames; a reader
  sees the old directory or the new one, never a mix, and the later of two such runs wins.
* Siblings of the same output left by a process of this host that no longer runs (a SIGKILL, a
  power cut) are cleaned up the next time that output is written: a partial directory is
  removed, and a moved-aside old output is put back if nothing replaced it.

These checks run before any expensive work: a bad ``--out`` fails in milliseconds, not after
minutes of compression.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import OutputError

log = logging.getLogger(__name__)

PARTIAL = "partial"
OLD = "old"
# Names carry a short hash of the host, so a directory shared between machines (NFS, a /tmp shared
# by containers) never has one host sweep what a live process of another host is writing.
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# A name of up to this many bytes leaves room for the ".<name>.partial-<pid>-<hex>" sibling.
_SIBLING_STEM_BYTES = 120


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale(parent: Path, pattern: str, pid_of: Callable[[Path], str]) -> None:
    """Delete the entries of ``parent`` matching ``pattern`` whose writing process has died.

    ``pid_of`` names an entry's process, or returns "" for an entry that is not this host's.
    """
    for path in stale(parent, pattern, pid_of):
        log.info("removing %s, left by a run that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)


def stale(parent: Path, pattern: str, pid_of: Callable[[Path], str]) -> list[Path]:
    """The entries of ``parent`` matching ``pattern`` (a glob) whose writing process has died."""
    found = []
    for path in parent.glob(pattern):
        pid = pid_of(path)
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            found.append(path)
    return found


def scratch_dir(tag: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary directory named after ``tag`` and this process; those of dead processes go first.

    The name ``osd-fleet-<tag>-<pid>-<random>`` lets the next run recognise scratch space that a
    SIGKILLed run could not remove (SIGTERM and Ctrl-C unwind and remove their own).
    """
    if not re.fullmatch(r"[a-z]+", tag):
        raise ValueError(f"scratch tag must be lowercase letters, got {tag!r}")
    root = Path(tempfile.gettempdir())
    remove_stale(root, f"osd-fleet-{tag}-{HOST}-*", lambda p: p.name.split("-")[4] if p.name.count("-") >= 5 else "")
    return tempfile.TemporaryDirectory(prefix=f"osd-fleet-{tag}-{HOST}-{os.getpid()}-")


class OutputDir:
    """A directory to be written in full and then published under ``out`` in one rename.

    ``inputs`` are the paths the command reads. ``is_ours`` says whether an existing directory
    may be replaced with ``overwrite`` (it receives the directory and returns a bool). Use as a
    context manager: ``with output as tmp: write into tmp, then output.publish()``; leaving the
    block without publishing removes the partial directory.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        what: str,
        inputs: Iterable[str | Path] = (),
        overwrite: bool = False,
        is_ours: Callable[[Path], bool],
    ) -> None:
        self.out = Path(out)
        self._what = what
        self._is_ours = is_ours
        self._replace = check_output(self.out, what=what, inputs=inputs, overwrite=overwrite, is_ours=is_ours)
        self.tmp = _sibling(self.out, PARTIAL)

    def __enter__(self) -> Path:
        try:
            self.tmp.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot create the working directory {self.tmp.name} beside it "
                              f"({exc.strerror})") from None
        return self.tmp

    def __exit__(self, *exc_info: object) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def publish(self) -> Path:
        """Move the finished directory to ``out``; refuse if another run got there first."""
        _fsync_tree(self.tmp)
        trash = None
        with _signals_held():
            if self._replace and self.out.exists():
                if not self.out.is_dir() or not self._is_ours(self.out):  # changed while this run worked
                    raise OutputError(f"{self.out}: is no longer an osd-fleet {self._what}; it is kept and this "
                                      "run's result was discarded")
                trash = _sibling(self.out, OLD)
                os.replace(self.out, trash)
            try:
                os.rename(self.tmp, self.out)  # onto a missing or empty directory only
            except OSError as exc:
                if trash is not None and not self.out.exists():
                    os.replace(trash, self.out)  # put the old output back rather than lose it
                    trash = None
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                raise OutputError(
                    f"{self.out}: another run wrote this {self._what} while this one was working; it is kept "
                    "and this run's result was discarded"
                ) from None
        if trash is not None:  # only now that the new output is in place
            shutil.rmtree(trash, ignore_errors=True)
        return self.out


def check_output(
    out: Path, *, what: str, inputs: Iterable[str | Path], overwrite: bool, is_ours: Callable[[Path], bool]
) -> bool:
    """Raise unless ``out`` may be written; return whether an existing ``out`` is to be replaced.

    Commands call this before long work (calibration, a measuring pass) so a bad ``--out``
    fails at once; :class:`OutputDir` calls it again when it is created. What a dead run of this
    host left beside ``out`` is cleaned up first, so the rules apply to what the user last had.
    """
    _check_name_length(out)
    refuse_inputs(out, inputs)
    if out.parent.is_dir():
        _recover_siblings(out)
    return _check_target(out, what, overwrite, is_ours)


def write_file(out: str | Path, data: bytes, *, what: str, is_ours: Callable[[Path], bool]) -> Path:
    """Write ``data`` to the file ``out`` atomically; an existing file is replaced only when ours.

    ``what`` names the file in messages ("PNG plot"); ``is_ours`` recognises a file osd-fleet
    wrote (a PNG, say), so a typo in ``--out`` cannot replace a checkpoint or a document.
    """
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; the {what} must go into a file")
    if out.exists() and not is_ours(out):
        raise OutputError(f"{out}: exists and is not a {what} osd-fleet wrote; move or delete it yourself, "
                          "or choose another name")
    _check_name_length(out)
    tmp = _sibling(out, PARTIAL)
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def refuse_inputs(out: Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output that is, contains, or lies inside one of ``inputs``."""
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source or target in source.parents:
            raise OutputError(f"{out}: is or contains the input {given}; choose an output outside every input")
        if source in target.parents and source.is_dir():
            raise OutputError(f"{out}: lies inside the input {given}; inputs are never modified, so choose an "
                              "output outside it")


def _check_target(out: Path, what: str, overwrite: bool, is_ours: Callable[[Path], bool]) -> bool:
    """Whether an existing ``out`` is to be replaced; raise if it may not be."""
    if not out.exists() and not out.is_symlink():
        return False
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; the {what} must go into a new directory")
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise OutputError(f"{out}: cannot list the existing directory ({exc.strerror})") from None
    if empty:
        return False
    if not overwrite:
        raise OutputError(f"{out}: output directory exists and is not empty (pass --overwrite to replace a {what})")
    if not is_ours(out):
        raise OutputError(
            f"{out}: exists and is not an osd-fleet {what}; --overwrite replaces only what osd-fleet wrote, "
            "so move or delete it yourself if you mean to"
        )
    return True


def _check_name_length(out: Path) -> None:
    """Fail now, not after the work, when the file system cannot hold the output's name."""
    anchor = out.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    try:
        limit = os.pathconf(anchor, "PC_NAME_MAX")
    except (OSError, ValueError):
        return
    for part in out.parts:
        if len(os.fsencode(part)) > limit:
            raise OutputError(f"{out}: the name {part[:40]!r}... is longer than this file system allows "
                              f"({limit} bytes)")


def _stem(out: Path) -> str:
    name = os.fsencode(out.name)[:_SIBLING_STEM_BYTES]
    return os.fsdecode(name)


def _sibling(out: Path, kind: str) -> Path:
    """A hidden sibling of ``out``: ``.<name>.<kind>-<host>-<pid>-<random>``."""
    return out.parent / f".{_stem(out)}.{kind}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _sibling_pid(path: Path) -> str:
    """The process id in a sibling's name when this host wrote it, else ""."""
    parts = path.name.rsplit("-", 3)
    return parts[2] if len(parts) == 4 and parts[1] == HOST else ""


def _recover_siblings(out: Path) -> None:
    """Clean up after dead runs of this host: put a moved-aside old output back if ``out`` is gone,
    then remove partial directories and any other moved-aside copies."""
    pattern = f".{glob.escape(_stem(out))}."
    for old in stale(out.parent, pattern + f"{OLD}-*", _sibling_pid):
        if not out.exists():
            log.info("putting back %s as %s: a run died while replacing it", old, out)
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    remove_stale(out.parent, pattern + f"{PARTIAL}-*", _sibling_pid)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM off (in the main thread) for a few renames that must not be split."""
    held = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def json_field(path: Path, field: str) -> object:
    """``field`` of the JSON object in ``path``, or None when the file is missing or not such JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data.get(field) if isinstance(data, dict) else None


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
