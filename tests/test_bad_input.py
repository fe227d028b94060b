"""Bad input at the command line beyond ``test_cli``'s: bit flips, ranks, names, artifacts.

Each is refused with one clear line (exit 2) and nothing is written; each is recorded in the
reliability table. A bit flip in a checkpoint's tensor data, unlike one in its header, cannot be
told from a different fine-tune (safetensors carries no checksum) unless it makes a value
non-finite, which ``test_cli`` covers; deltas carry checksums, see ``test_artifact``'s fuzz test.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from osd_cli.main import main
from osd_core.manifest import FORMAT_VERSION


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def flip(data: bytearray, at: int, bit: int) -> bytearray:
    data[at] ^= 1 << bit
    return data


@pytest.mark.parametrize(
    "case,where,message",
    [
        ("header length", lambda data: flip(data, 0, 6), "safetensors header is not valid JSON"),
        ("dtype", lambda data: flip(data, data.index(b'"F32"') + 1, 0), "has unsupported dtype G32"),
        ("shape", lambda data: flip(data, data.index(b'"shape":[') + 9, 1), r"spans \d+ bytes, expected \d+"),
    ],
)
def test_bit_flips_in_a_safetensors_header_are_refused(capsys, synthetic_pair, tmp_path, reliability, case, where,
                                                       message):
    base, tuned = synthetic_pair
    bad = tmp_path / "flipped"
    shutil.copytree(tuned, bad)
    (bad / "model.safetensors").write_bytes(bytes(where(bytearray((bad / "model.safetensors").read_bytes()))))
    code, err = run_cli(capsys, "compress", "--base", base, "--finetuned", bad, "--out", tmp_path / "d")
    assert code == 2 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "d").exists()
    reliability.refused(f"fine-tune safetensors with a bit flipped in its {case}", err)


def test_a_rank_beyond_every_matrix_is_refused(capsys, synthetic_pair, tmp_path, reliability):
    base, tuned = synthetic_pair
    code, err = run_cli(capsys, "compress", "--base", base, "--finetuned", tuned, "--out", tmp_path / "d",
                        "--method", "truncsvd", "--rank", "40")
    assert code == 2 and "rank k = 40 exceeds min(n, d) of every matrix to compress (the largest is 32)" in err
    assert not (tmp_path / "d").exists()
    reliability.refused("rank beyond every matrix of the model (32x32 and 64x32 layers, --rank 40)", err)


@pytest.mark.parametrize(
    "case,name",
    [("escaping its prefix", "../escape"), ("that is an absolute path", "/etc/passwd"),
     ("with odd characters", "a b;rm -rf ~"), ("that is only dots", "..")],
)
def test_model_names_cannot_leave_their_prefix(capsys, synthetic_pair, tmp_path, reliability, case, name):
    base, tuned = synthetic_pair
    code, err = run_cli(capsys, "run", "--model", name, "--base", base, "--finetuned", tuned, "--methods", "truncsvd",
                        "--store", tmp_path / "store")
    assert code == 2 and f"model {name!r}: name {name!r}" in err
    assert not (tmp_path / "store").exists() and not (tmp_path.parent / "escape").exists()
    reliability.refused(f"model name {case} ({name!r})", err)


@pytest.fixture
def delta(synthetic_pair, tmp_path, capsys):
    base, tuned = synthetic_pair
    assert run_cli(capsys, "compress", "--base", base, "--finetuned", tuned, "--out", tmp_path / "delta",
                   "--method", "truncsvd")[0] == 0
    return tmp_path / "delta"


def test_a_delta_with_a_flipped_payload_bit_is_refused(capsys, synthetic_pair, delta, tmp_path, reliability):
    payload = next(delta.glob("payload-*.safetensors"))
    payload.write_bytes(bytes(flip(bytearray(payload.read_bytes()), -5, 3)))
    code, err = run_cli(capsys, "reconstruct", "--base", synthetic_pair[0], "--delta", delta, "--out", tmp_path / "r")
    assert code == 2 and "checksum mismatch" in err and not (tmp_path / "r").exists()
    reliability.refused("delta whose payload checksum does not match its manifest", err)


def test_a_delta_of_another_format_version_is_refused(capsys, synthetic_pair, delta, tmp_path, reliability):
    manifest = json.loads((delta / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (delta / "manifest.json").write_text(json.dumps(manifest))
    code, err = run_cli(capsys, "reconstruct", "--base", synthetic_pair[0], "--delta", delta, "--out", tmp_path / "r")
    assert code == 2 and f"format version {FORMAT_VERSION + 1} is not supported" in err
    assert not (tmp_path / "r").exists()
    reliability.refused("delta of a newer format version", err)


def test_a_delta_is_refused_on_another_base(capsys, synthetic_pair, delta, tmp_path, reliability):
    code, err = run_cli(capsys, "reconstruct", "--base", synthetic_pair[1], "--delta", delta, "--out", tmp_path / "r")
    assert code == 2 and "differ from the base this delta was made against" in err
    assert not (tmp_path / "r").exists()
    reliability.refused("delta applied to a base other than its own", err)
