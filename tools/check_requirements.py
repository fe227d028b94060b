"""Refuse requirement files that name a local path or URL: a fresh machine has neither.

``pip freeze`` records a package installed from a local wheel as ``name @ file:///tmp/...``. Such
a lock installs on the machine that made it and fails for every new user, and CI on that machine
stays green. This check runs before anything is installed (stdlib only), at the start of
``.ci/run`` and as a test, over ``requirements*.txt``, ``requirements*.lock`` and the dependency
lists of ``pyproject.toml``. Each requirement must name a registry package: a name, optional
extras, version specifiers (the lock pins ``name==version``), a marker and hashes; nothing else.

Usage: ``python3 tools/check_requirements.py [ROOT]``; exit 2 and one line per finding.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# What a fresh machine cannot resolve: a file: URL, a direct reference (name @ url), an absolute
# or home path, /tmp, an editable install or a local index.
_LOCAL = (
    (re.compile(r"\bfile:", re.IGNORECASE), "a file: URL"),
    (re.compile(r"^\s*[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?\s*@"), "a direct reference (name @ URL or path)"),
    (re.compile(r"(^|[\s=\"'])(/|~/|[A-Za-z]:\\)"), "an absolute path"),
    (re.compile(r"/tmp/"), "a /tmp path"),
    (re.compile(r"^\s*(-e|--editable)\b"), "an editable install (-e PATH)"),
    (re.compile(r"^\s*(-f|--find-links|-i|--index-url|--extra-index-url)\b"), "a local or extra package index"),
    (re.compile(r"^\s*(-r|-c|--requirement|--constraint)\b"), "an include of another file"),
)
# What may stand instead: a name, optional extras, version specifiers, an environment marker and
# hashes. Anything else (a bare URL, git+https://, a relative wheel path) is not a registry pin.
_PIN = re.compile(
    r"^\s*[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,\s-]+\])?"
    r"(\s*(==|!=|<=|>=|~=|<|>)\s*[A-Za-z0-9.*+!_-]+(\s*,\s*(==|!=|<=|>=|~=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?"
    r"\s*(;[^#]*)?(\s+--hash=[a-z0-9]+:[0-9a-f]+)*\s*$"
)


@dataclass(frozen=True)
class Finding:
    """One requirement line that names something only this machine has."""

    file: Path
    line: int
    text: str
    why: str

    def __str__(self) -> str:
        return (f"{self.file}:{self.line}: {self.why} in {self.text.strip()!r}: pin by name and version "
                "(name==version) so a fresh machine installs it from the registry")


def check_lines(file: Path, lines: Iterable[tuple[int, str]]) -> Iterator[Finding]:
    """Findings among ``(line number, requirement text)`` pairs; comments are ignored."""
    for number, text in lines:
        requirement = text.split(" #", 1)[0] if not text.lstrip().startswith("#") else ""
        if not requirement.strip():
            continue
        why = next((why for pattern, why in _LOCAL if pattern.search(requirement)), None)
        if why is None and not _PIN.match(requirement):
            why = "not a registry requirement"
        if why is not None:
            yield Finding(file, number, text, why)


def check_requirements_file(path: Path) -> list[Finding]:
    return list(check_lines(path, enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)))


def check_pyproject(path: Path) -> list[Finding]:
    """Dependency strings of ``[build-system]`` and ``[project]``, located by line for the message."""
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    project = data.get("project", {})
    requirements = [*data.get("build-system", {}).get("requires", []), *project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    lines = text.splitlines()

    def where(requirement: str) -> int:
        return next((i for i, line in enumerate(lines, start=1) if requirement in line), 0)

    return list(check_lines(path, ((where(r), r) for r in requirements)))


def check_tree(root: Path) -> list[Finding]:
    """Every finding in the project at ``root``."""
    findings: list[Finding] = []
    for path in sorted({*root.glob("requirements*.txt"), *root.glob("requirements*.lock")}):
        findings.extend(check_requirements_file(path))
    if (root / "pyproject.toml").is_file():
        findings.extend(check_pyproject(root / "pyproject.toml"))
    return findings


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent
    findings = check_tree(root)
    for finding in findings:
        print(f"check_requirements: {finding}", file=sys.stderr)
    return 2 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
