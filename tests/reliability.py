"""The reliability table: fault and bad-input tests record what they did; the session writes it.

Why: the figures in ``docs/reliability.md`` must come from the tests, not from a hand-written
claim. A test takes the ``reliability`` fixture and records each fault it injected (runs tried,
runs that survived, what was checked) or each bad input it refused (the error the user saw).
With ``OSD_RELIABILITY_OUT=path`` set, the session renders every record as markdown at ``path``;
``make reliability`` runs exactly the tests that take the fixture (``pytest -m reliability``). A
record whose test then fails is marked FAILED in the table, so the table never claims more than
the tests proved; a session that records nothing writes nothing.

Load with ``pytest_plugins = ["tests.reliability"]`` (conftest).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["Recorder", "reliability"]

OUT_ENV = "OSD_RELIABILITY_OUT"


@dataclass
class _Record:
    kind: str  # "fault" or "bad_input"
    case: str
    details: list[str]  # what was checked (fault) or the error message (bad input), once per distinct text
    tried: int = 0
    survived: int = 0
    seconds: float = 0.0
    failed_tests: set[str] = field(default_factory=set)


_RECORDS = pytest.StashKey[dict[tuple[str, str], _Record]]()
_BY_TEST = pytest.StashKey[dict[str, list[_Record]]]()


class Recorder:
    """What one test records; a case recorded again (another parameter, another test) adds up its runs."""

    def __init__(self, config: pytest.Config, nodeid: str, scrub: tuple[str, ...]) -> None:
        self._records = config.stash[_RECORDS]
        self._mine = config.stash[_BY_TEST].setdefault(nodeid, [])
        self._scrub = scrub

    def fault(self, case: str, *, tried: int, survived: int, checked: str, seconds: float) -> None:
        """``tried`` runs under the fault, ``survived`` of them met every check in ``checked``."""
        record = self._get("fault", case, checked)
        record.tried += tried
        record.survived += survived
        record.seconds += seconds

    def refused(self, case: str, error: str) -> None:
        """A bad input refused with ``error``: the message as the user saw it.

        From a command's stderr, the line after ``osd-fleet: error:`` (progress bars may precede it);
        otherwise the first line.
        """
        head, marker, line = error.strip().partition("osd-fleet: error: ")
        line = (line if marker else head).partition("\n")[0].strip()
        if not line:
            raise ValueError(f"bad input {case!r} was refused without a message")
        self._get("bad_input", case, self._clean(line))

    def _get(self, kind: str, case: str, detail: str) -> _Record:
        record = self._records.setdefault((kind, case), _Record(kind, case, []))
        if detail not in record.details:  # the same case from another test or parameter may say more
            record.details.append(detail)
        if record not in self._mine:
            self._mine.append(record)
        return record

    def _clean(self, text: str) -> str:
        """Drop what differs between sessions (temporary paths, ports, random ids) from a message."""
        for path in self._scrub:
            text = text.replace(path, "$TMP")
        text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
        return re.sub(r"\b[0-9a-f]{32}\b", "<uuid>", text)


@pytest.fixture
def reliability(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Recorder:
    """Record faults and refused bad inputs into the session's reliability table."""
    base = tmp_path_factory.getbasetemp()
    return Recorder(request.config, request.node.nodeid, (str(base.resolve()), str(base)))


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RECORDS] = {}
    config.stash[_BY_TEST] = {}
    config.addinivalue_line("markers", "reliability: records into the reliability table (`pytest -m reliability`)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that takes the fixture, so ``-m reliability`` selects exactly the table's tests."""
    for item in items:
        if "reliability" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.reliability)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed:
        for record in item.config.stash[_BY_TEST].get(item.nodeid, []):
            record.failed_tests.add(item.nodeid)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = os.environ.get(OUT_ENV)
    records = list(session.config.stash[_RECORDS].values())
    if out and records:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(render(records))


def render(records: list[_Record]) -> str:
    """The markdown document: faults with runs tried and survived, then bad inputs with their errors."""
    faults = [r for r in records if r.kind == "fault"]
    bad = [r for r in records if r.kind == "bad_input"]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    lines = [
        "# Reliability",
        "",
        f"Generated by the test suite (`make reliability`) on {when}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}. Do not edit by hand.",
        "",
        _summary(faults, bad),
        "",
        "## Faults",
        "",
        "| fault | runs tried | survived | seconds | what every surviving run showed |",
        "|---|---|---|---|---|",
    ]
    for r in faults:
        status = " **FAILED**" if r.failed_tests or r.survived < r.tried else ""
        checked = _cell("; ".join(r.details))
        lines.append(f"| {_cell(r.case)}{status} | {r.tried} | {r.survived} | {r.seconds:.1f} | {checked} |")
    refused = sum(1 for r in bad if not r.failed_tests)
    lines += [
        "",
        "## Bad input",
        "",
        f"{len(bad)} distinct bad inputs, {refused} refused as expected: nothing written, nothing lost.",
        "",
        "| bad input | error (as printed after `osd-fleet: error:`, or raised) |",
        "|---|---|",
    ]
    for r in bad:
        status = " **FAILED**" if r.failed_tests else ""
        lines.append(f"| {_cell(r.case)}{status} | {'; '.join(f'`{_cell(d)}`' for d in r.details)} |")
    return "\n".join(lines) + "\n"


def _summary(faults: list[_Record], bad: list[_Record]) -> str:
    """Cases tried, and how many were lost: a case is lost when its test failed, for each test
    checks that no input or unrelated file changed, nothing was written outside the output, and
    no wrong reconstruction exited 0."""
    lost_faults = [r for r in faults if r.failed_tests or r.survived < r.tried]
    lost_inputs = [r for r in bad if r.failed_tests]
    return (f"**{len(faults) + len(bad)} cases tried**: {len(faults)} faults ({sum(r.tried for r in faults)} runs) "
            f"and {len(bad)} bad inputs. **Lost: {len(lost_faults) + len(lost_inputs)}** "
            f"({len(lost_faults)} faults, {len(lost_inputs)} bad inputs).")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")
