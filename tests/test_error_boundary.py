"""The CLI's one error boundary: every expected failure is one line and exit 2; a bug is exit 1.

Covers what an outside probe found giving tracebacks: bad store URIs, a secret in an endpoint URL,
a read-only or full file system, out-of-range numbers, a configuration that disagrees with its
head, and ``run`` parameters or data that used to be checked only after Prefect and Ray had
started. Mounting a small tmpfs (for "disk full" and "read-only") needs root, which CI has.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import flows.pipeline
from osd_cli.main import EXIT_BUG, main

SECRET = "PASSWORD-" + uuid.uuid4().hex[:8]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out + err


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("osd-fleet:")]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("store,message", [
    ("ftp://x", "unsupported storage URI 'ftp://x'"),
    ("s3://", "has no bucket"),
    ("file://otherhost/x", "names a host"),
    ("s3://Not_A_Bucket/x", "invalid S3 bucket name"),
    (f"ftp://user:{SECRET}@host/x", "unsupported storage URI 'ftp://host/x'"),
])
def test_bad_store_uris_are_one_line_and_exit_2(capsys, reliability, store, message):
    code, text = run_cli(capsys, "catalog", "list", "--store", store)
    line = one_error_line(text)
    assert code == 2 and message in line and SECRET not in text, text
    reliability.refused(f"catalog list --store {store.replace(SECRET, 'SECRET')}", line)


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_a_password_in_an_endpoint_url_is_never_printed_or_logged(capsys, caplog, monkeypatch, reliability,
                                                                  variable):
    monkeypatch.setenv(variable, f"http://user:{SECRET}@bad_host:1")
    with caplog.at_level(logging.DEBUG):
        code, text = run_cli(capsys, "catalog", "list", "--store", "s3://bucket/prefix")
    line = one_error_line(text)
    assert code == 2 and "carries a user name or password" in line
    assert SECRET not in text and not any(SECRET in record.getMessage() for record in caplog.records)
    reliability.refused(f"{variable} with user:password@ and a host botocore refuses", line.replace(SECRET, "SECRET"))


@pytest.fixture
def tiny_mount(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount small tmpfs file systems under ``tmp_path``; unmount them afterwards."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs needs root here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_partial(capsys, real_pair, tmp_path, tiny_mount, reliability):
    base, tuned = real_pair
    full = tiny_mount("full", "size=256k")
    code, text = run_cli(capsys, "compress", "--base", base, "--finetuned", tuned, "--out", full / "delta")
    line = one_error_line(text)
    assert code == 2 and "No space left on device" in line, text
    assert list(full.iterdir()) == []
    reliability.refused("compress onto a full file system (256 KiB tmpfs)", line)


def test_a_read_only_file_system_is_one_line(capsys, synthetic_pair, tmp_path, tiny_mount, reliability):
    base, tuned = synthetic_pair
    read_only = tiny_mount("ro", "ro,size=64k")
    code, text = run_cli(capsys, "compress", "--base", base, "--finetuned", tuned, "--out", read_only / "delta")
    line = one_error_line(text)
    assert code == 2 and "Read-only file system" in line, text
    reliability.refused("compress --out on a read-only file system", line)


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["--seed", str(2**64)], "seed must be an integer from 0 to 2**63 - 1"),
    (["--seed", "-1"], "seed must be an integer from 0 to 2**63 - 1"),
])
def test_out_of_range_numbers_are_refused(capsys, synthetic_pair, tmp_path, reliability, args, message):
    base, tuned = synthetic_pair
    try:
        code, text = run_cli(capsys, "compress", "--base", base, "--finetuned", tuned, "--out", tmp_path / "d", *args)
    except SystemExit as exited:  # argparse's own usage error, also exit 2
        code, text = exited.code, capsys.readouterr().err
    assert code == 2 and message in text and "Traceback" not in text, text
    assert not (tmp_path / "d").exists()
    reliability.refused(f"compress {' '.join(args)}", text.strip().splitlines()[-1])


def test_a_config_whose_labels_disagree_with_the_head_is_one_line(capsys, real_pair, tmp_path, reliability):
    base, tuned = real_pair
    bad = tmp_path / "three-labels"
    shutil.copytree(tuned, bad)
    config = json.loads((bad / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    config["label2id"] = {"a": 0, "b": 1, "c": 2}
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["compress", "--base", str(base), "--finetuned", str(bad), "--out", str(tmp_path / "d")]) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "fine", "label": 2}) + "\n")
    capsys.readouterr()
    code, text = run_cli(capsys, "evaluate", "--base", base, "--delta", tmp_path / "d", "--data", rows)
    line = one_error_line(text)
    assert code == 2 and "do not fit config.json as a sequence classifier with 3 labels" in line, text
    reliability.refused("evaluate a fine-tune whose config names 3 labels and whose head has 2", line)


@pytest.fixture
def no_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if ``run`` would start Prefect or Ray."""
    def refuse(**_: object) -> None:
        raise AssertionError("the runtime was started before the parameters were checked")

    monkeypatch.setattr(flows.pipeline, "start_runtime", refuse)


@pytest.mark.parametrize("case", ["a budget no matrix can hold", "eval labels outside the model's classes",
                                  "a store URI of an unknown scheme", "a missing eval file"])
def test_run_checks_parameters_and_data_before_starting_any_server(capsys, real_pair, tmp_path, no_runtime,
                                                                   reliability, case):
    base, tuned = real_pair
    rows = tmp_path / "eval.jsonl"
    rows.write_text(json.dumps({"text": "fine", "label": 7 if "labels" in case else 1}) + "\n")
    args = {"--ranks": "1e9" if "budget" in case else "1", "--store": "ftp://x" if "URI" in case else tmp_path,
            "--eval": tmp_path / "absent.jsonl" if "missing" in case else rows}
    code, text = run_cli(capsys, "run", "--model", "m", "--base", base, "--finetuned", tuned, "--methods", "truncsvd",
                         *(str(x) for pair in args.items() for x in pair))
    line = one_error_line(text)
    expected = {"a budget no matrix can hold": "exceeds min(n, d) of every matrix",
                "eval labels outside the model's classes": "label 7 is outside [0, 2)",
                "a store URI of an unknown scheme": "unsupported storage URI",
                "a missing eval file": "absent.jsonl"}[case]
    assert code == 2 and expected in line, text
    assert not list(tmp_path.glob("catalog*")) and not (tmp_path / "artifacts").exists()
    reliability.refused(f"run with {case} (refused before Prefect and Ray start)", line)


def test_a_bug_is_one_line_and_exit_1_with_its_traceback_behind_verbose(capsys, monkeypatch, tmp_path):
    import osd_cli.fleet

    def broken(args: object) -> int:
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(osd_cli.fleet, "run_list", broken)
    code, text = run_cli(capsys, "catalog", "list", "--store", tmp_path)
    assert code == EXIT_BUG and "internal error (a bug in osd-fleet): RuntimeError: an invariant broke" in text
    assert "Traceback" not in text
    with pytest.raises(RuntimeError, match="an invariant broke"):
        main(["--verbose", "catalog", "list", "--store", str(tmp_path)])

