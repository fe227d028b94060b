"""One rule for outputs: exclusive, replaced only when ours, never an input; no debris after a kill.

Each case runs the real command (in this process, or as a subprocess where a signal or a race is
the point) and then checks, by content hash, that every input and every unrelated file is exactly
as it was: a refusal that deleted something first would still fail here.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from flows.report import PNG_SIGNATURE, is_png
from osd_cli.main import EXIT_TERMINATED, main
from osd_core.artifact import DeltaArtifact, DeltaWriter
from osd_core.errors import OutputError
from osd_core.layer import CompressedLayer
from osd_core.outputs import HOST, pid_alive, write_file
from osd_core.reconstruct import RESTORE_MARKER


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) by relative path, with its sha256."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def compress(base: Path, tuned: Path, out: Path, *extra: object) -> list[object]:
    return ["compress", "--base", base, "--finetuned", tuned, "--out", out, "--method", "truncsvd", *extra]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)
    return child.pid


@pytest.mark.parametrize("target", ["finetuned", "base", "parent of the base", "inside the fine-tune"])
def test_overwrite_never_replaces_or_enters_an_input(capsys, synthetic_pair, tmp_path, reliability, target):
    base, tuned = synthetic_pair
    out = {"finetuned": tuned, "base": base, "parent of the base": base.parent,
           "inside the fine-tune": tuned / "delta"}[target]
    before = tree_digest(tmp_path)
    code, err = run_cli(capsys, *compress(base, tuned, out, "--overwrite"))
    assert code == 2 and "Traceback" not in err
    assert "input" in err, err
    assert tree_digest(tmp_path) == before
    reliability.refused(f"compress --overwrite with --out naming {target}", err)


def test_overwrite_never_deletes_a_folder_that_is_not_a_delta(capsys, synthetic_pair, tmp_path, reliability):
    base, tuned = synthetic_pair
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    (folder / "manifest.json").write_text(json.dumps({"format": "not-ours"}))
    code, err = run_cli(capsys, *compress(base, tuned, folder, "--overwrite"))
    assert code == 2 and "is not an osd-fleet delta" in err, err
    assert (folder / "chapter1.tex").read_text() == "years of work"
    reliability.refused("compress --overwrite onto a folder of unrelated files", err)


def test_overwrite_replaces_a_delta_and_a_restored_checkpoint(capsys, synthetic_pair, tmp_path):
    base, tuned = synthetic_pair
    delta, restored = tmp_path / "delta", tmp_path / "restored"
    assert run_cli(capsys, *compress(base, tuned, delta))[0] == 0
    first = DeltaArtifact.open(delta).manifest.config["rank"]
    assert run_cli(capsys, *compress(base, tuned, delta, "--rank", "2", "--overwrite"))[0] == 0
    assert DeltaArtifact.open(delta).manifest.config["rank"] == 2 != first
    assert run_cli(capsys, "reconstruct", "--base", base, "--delta", delta, "--out", restored)[0] == 0
    marker = json.loads((restored / RESTORE_MARKER).read_text())
    assert marker["delta_manifest_sha256"] == DeltaArtifact.open(delta).manifest_sha256
    assert run_cli(capsys, "reconstruct", "--base", base, "--delta", delta, "--out", restored, "--overwrite")[0] == 0
    code, err = run_cli(capsys, *compress(base, tuned, restored, "--overwrite"))  # a checkpoint is not a delta
    assert code == 2 and "is not an osd-fleet delta" in err
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("case", ["an existing file", "a name too long for the file system"])
def test_outputs_the_file_system_cannot_take_fail_before_any_work(capsys, synthetic_pair, tmp_path, reliability,
                                                                  case):
    base, tuned = synthetic_pair
    if case == "an existing file":
        out = tmp_path / "notes.txt"
        out.write_text("mine")
        expected = "exists and is not a directory"
    else:
        out = tmp_path / ("d" * 300)
        expected = "longer than this file system allows"
    before = tree_digest(tmp_path)
    code, err = run_cli(capsys, *compress(base, tuned, out, "--overwrite"))
    assert code == 2 and expected in err, err
    assert tree_digest(tmp_path) == before
    reliability.refused(f"compress --out naming {case}", err)


def test_of_two_writers_of_one_output_exactly_one_wins(tmp_path):
    """Both pass the up-front check; the second to publish is refused and the first's delta stays."""
    out = tmp_path / "delta"
    layer = CompressedLayer("w", "dense", (2,), {"values": torch.ones(2)}, k=0, budget_bits=None, paper_bits=64)
    fields = {"config": {}, "base": {}, "finetuned": {}, "allocation": "uniform"}
    first, second = DeltaWriter(out), DeltaWriter(out)
    with first, second:
        first.add(layer, dtype="F32")
        second.add(layer, dtype="F16")
        first.commit(**fields)
        with pytest.raises(OutputError, match="another run wrote this delta while this one was working"):
            second.commit(**fields)
    assert DeltaArtifact.open(out).manifest.layers["w"].dtype == "F32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]


def test_two_compress_processes_started_at_once_one_succeeds_one_fails_cleanly(synthetic_pair, tmp_path,
                                                                               reliability):
    base, tuned = synthetic_pair
    out = tmp_path / "delta"
    argv = [sys.executable, "-m", "osd_cli", *map(str, compress(base, tuned, out))]
    started = time.perf_counter()
    runs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and ("another run wrote this delta" in loser or "not empty" in loser), loser
    DeltaArtifact.open(out)  # the winner's delta is whole and verifies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "delta", "ft"]
    reliability.fault("two compress runs started at once with the same --out", tried=1, survived=1,
                      checked="exactly one exit 0, the other exit 2 with one line; the delta verifies; no debris",
                      seconds=time.perf_counter() - started)


def test_sigterm_removes_the_partial_output_and_the_scratch_directory(real_pair, calibration_file, tmp_path,
                                                                      reliability):
    base, tuned = real_pair
    out = tmp_path / "delta"
    argv = [sys.executable, "-m", "osd_cli", "compress", "--base", str(base), "--finetuned", str(tuned),
            "--out", str(out), "--rank", "0.5", "--allocation", "global"]
    started = time.perf_counter()
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scratch_pattern = f"osd-fleet-compress-{HOST}-{run.pid}-*"
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".delta.partial-*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, "compress finished before it could be interrupted"
    assert list(Path(tempfile.gettempdir()).glob(scratch_pattern))
    run.send_signal(signal.SIGTERM)
    code = run.wait(timeout=60)
    err = run.stderr.read()
    assert code == EXIT_TERMINATED and "osd-fleet: terminated" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert not list(Path(tempfile.gettempdir()).glob(scratch_pattern))
    reliability.fault("SIGTERM while compressing (global allocation, real L6 pair)", tried=1, survived=1,
                      checked=f"exit {EXIT_TERMINATED}, one line; no partial output and no scratch directory left",
                      seconds=time.perf_counter() - started)


def test_debris_of_a_killed_run_is_swept_by_the_next_one(capsys, synthetic_pair, tmp_path, reliability):
    base, tuned = synthetic_pair
    gone, alive = dead_pid(), os.getppid()
    partial = tmp_path / f".delta.partial-{HOST}-{gone}-0123456789ab"
    scratch = Path(tempfile.gettempdir()) / f"osd-fleet-compress-{HOST}-{gone}-abcdef"
    kept = tmp_path / f".delta.partial-{HOST}-{alive}-0123456789ab"  # a live run's: never touched
    foreign = tmp_path / f".delta.partial-0000beef-{gone}-0123456789ab"  # another host's: never touched
    for path in (partial, scratch, kept, foreign):
        path.mkdir()
        (path / "payload-00000.safetensors").write_bytes(b"half")
    assert run_cli(capsys, *compress(base, tuned, tmp_path / "delta"))[0] == 0
    assert not partial.exists() and not scratch.exists() and kept.is_dir() and foreign.is_dir()
    reliability.fault("SIGKILL leftovers: a partial delta and a scratch directory of a dead process", tried=1,
                      survived=1, checked="the next run removes both; a live process's or another host's partial "
                      "is kept", seconds=0)


def test_a_run_killed_while_replacing_its_output_loses_neither_copy(capsys, synthetic_pair, tmp_path, reliability):
    """A SIGKILL between moving the old delta aside and renaming the new one into place."""
    base, tuned = synthetic_pair
    delta = tmp_path / "delta"
    assert run_cli(capsys, *compress(base, tuned, delta))[0] == 0
    before = tree_digest(delta)
    moved = tmp_path / f".delta.old-{HOST}-{dead_pid()}-0123456789ab"
    delta.rename(moved)  # what the killed run left: the old delta moved aside, nothing in its place
    code, err = run_cli(capsys, *compress(base, tuned, delta))  # no --overwrite: the old one is put back, kept
    assert code == 2 and "not empty" in err, err
    assert tree_digest(delta) == before and not moved.exists()
    delta.rename(moved)
    assert run_cli(capsys, *compress(base, tuned, delta, "--rank", "2", "--overwrite"))[0] == 0
    assert DeltaArtifact.open(delta).manifest.config["rank"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "delta", "ft"]
    reliability.fault("SIGKILL between moving the old delta aside and publishing the new one", tried=1,
                      survived=1, checked="the next run puts the old delta back first; nothing lost", seconds=0)


def test_a_file_output_replaces_only_a_file_of_its_own_kind(tmp_path, reliability):
    weights, plot = tmp_path / "model.safetensors", tmp_path / "plot.png"
    weights.write_bytes(b"precious weights")
    plot.write_bytes(PNG_SIGNATURE + b"an old plot")
    with pytest.raises(OutputError, match="exists and is not a PNG plot osd-fleet wrote") as refused:
        write_file(weights, PNG_SIGNATURE + b"new", what="PNG plot", is_ours=is_png)
    assert weights.read_bytes() == b"precious weights"
    write_file(plot, PNG_SIGNATURE + b"new", what="PNG plot", is_ours=is_png)
    assert plot.read_bytes() == PNG_SIGNATURE + b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "plot.png"]
    reliability.refused("catalog plot --out naming an existing file that is not a PNG", str(refused.value))
