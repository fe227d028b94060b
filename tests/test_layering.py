"""Imports run one way: osd_core ← osd_io, workloads ← workers ← flows ← osd_cli, with no cycle.

Why: the pipeline's layers are only real while the import graph says so. Each package may import
the packages below it and never one above it or beside it; within the project, no module may
reach itself through top-level imports. Imports inside functions count for the direction too:
a lazy upward import is still an upward dependency. Read from the source with ``ast``, so the
test needs none of the heavy packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A package's rank: it may import packages of lower rank only (and itself).
RANKS = {"osd_core": 0, "osd_io": 1, "workloads": 1, "workers": 2, "flows": 3, "osd_cli": 4}


def modules() -> dict[str, Path]:
    found = {}
    for package in RANKS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path, *, top_level_only: bool) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import of a project package in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this package
                package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                stem = f"{base}.{node.module}" if node.module else base
            else:
                stem = node.module or ""
            targets = [stem, *(f"{stem}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in RANKS:
                yield target, node.lineno


def test_every_import_points_down_the_layers() -> None:
    upward = []
    for name, path in modules().items():
        mine = name.split(".")[0]
        for target, line in imports(path, top_level_only=False):
            theirs = target.split(".")[0]
            if theirs != mine and RANKS[theirs] >= RANKS[mine]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {target}")
    assert upward == []


def test_no_module_imports_itself_through_others() -> None:
    known = modules()
    graph = {name: sorted({t for t, _ in imports(path, top_level_only=True) if t in known and t != name})
             for name, path in known.items()}
    cycles = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_layering_test_sees_every_package_and_lazy_imports(tmp_path: Path) -> None:
    assert {name.split(".")[0] for name in modules()} == set(RANKS)
    assert len(modules()) > 40
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom osd_core import errors\n\ndef later():\n    from flows.plan import plan_model\n")
    assert {t for t, _ in imports(probe, top_level_only=False)} >= {"osd_core", "flows.plan"}
    assert "flows.plan" not in {t for t, _ in imports(probe, top_level_only=True)}


def test_the_command_line_parses_without_torch():
    """``osd-fleet --help`` and argument errors answer at once: torch (and transformers, Ray, Prefect,
    pandas) are imported by the commands that use them, not by the parser."""
    probe = ("import sys, osd_cli.main; parser = osd_cli.main.build_parser(); "
             "heavy = [m for m in ('torch', 'transformers', 'ray', 'prefect', 'pandas') if m in sys.modules]; "
             "print(heavy)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
