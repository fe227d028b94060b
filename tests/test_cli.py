"""The command line: happy paths print what users need; bad input exits 2 with one clear line."""

import json
import shutil
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from osd_cli.main import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def compress_args(base, tuned, out, *extra):
    return ["compress", "--base", base, "--finetuned", tuned, "--out", out, *extra]


def test_compress_json_reports_bits_bytes_errors_and_time(capsys, synthetic_pair, tmp_path):
    base, tuned = synthetic_pair
    code, out, _ = run_cli(capsys, *compress_args(base, tuned, tmp_path / "d", "--method", "magtruncsvd",
                                                  "--rank", "1", "--extra-rank", "2", "--json"))
    assert code == 0
    report = json.loads(out)
    assert report["method"] == "magtruncsvd" and report["r"] == 1 and report["c"] == 2
    assert 0 < report["paper_bits"] <= report["budget_bits"]
    assert report["bytes_written"] > report["payload_bytes"] > 0 and report["seconds"] > 0
    assert 0 < report["layers"]["bert.encoder.layer.0.intermediate.dense.weight"]["rel_error"] < 1


def test_a_fractional_budget_spent_globally(capsys, synthetic_pair, tmp_path):
    base, tuned = synthetic_pair
    reports = {}
    for allocation in ("uniform", "global-all"):
        code, out, err = run_cli(capsys, *compress_args(base, tuned, tmp_path / allocation, "--rank", "0.5",
                                                        "--allocation", allocation, "--json"))
        assert code == 0
        assert ("--allocation global-all spends" in err) == (allocation == "uniform")  # the nudge, once
        reports[allocation] = json.loads(out)
    spread = reports["global-all"]
    assert (spread["r"], spread["c"], spread["allocation"]) == (0.5, 3.5, "global-all")  # int4: k = 8r = 4
    assert 0 < spread["paper_bits"] <= spread["budget_bits"] <= reports["uniform"]["budget_bits"]
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        run_cli(capsys, *compress_args(base, tuned, tmp_path / "x", "--rank", "half"))
    assert exited.value.code == 2 and "expected a number, got 'half'" in capsys.readouterr().err


def test_osd_compress_and_reconstruct_end_to_end(capsys, real_pair, calibration_file, tmp_path):
    base, tuned = real_pair
    code, out, _ = run_cli(capsys, *compress_args(base, tuned, tmp_path / "d", "--method", "osd", "--rank", "1",
                                                  "--extra-rank", "2", "--calibration", calibration_file, "--json"))
    assert code == 0 and json.loads(out)["method"] == "osd"
    code, out, _ = run_cli(capsys, "reconstruct", "--base", base, "--delta", tmp_path / "d", "--out", tmp_path / "r")
    assert code == 0 and (tmp_path / "r" / "model.safetensors").is_file()


BAD_CHECKPOINTS = {
    "shape": "base and fine-tune tensors of different shapes",
    "missing": "a tensor of the base missing from the fine-tune",
    "nan": "NaN weight in the fine-tune",
    "inf": "Inf weight in the fine-tune",
    "pickle": "pickle-only fine-tune (pytorch_model.bin, never unpickled)",
    "truncated": "truncated safetensors file",
    "architecture": "base and fine-tune of different architectures",
}


def corrupt(kind, base, tuned, tmp_path):
    """Make a bad fine-tune directory of the given kind; returns (path, expected message)."""
    bad = tmp_path / f"bad-{kind}"
    bad.mkdir()
    (bad / "config.json").write_bytes((tuned / "config.json").read_bytes())
    state = load_file(tuned / "model.safetensors")
    if kind == "shape":
        state["bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)
        message = "has shape \\[65, 32\\]"
    elif kind == "missing":
        del state["bert.encoder.layer.1.output.dense.weight"]
        message = "lacks 1 tensor"
    elif kind == "nan":
        state["bert.encoder.layer.0.attention.self.key.weight"][0, 0] = float("nan")
        message = "attention.self.key.weight' contains 1 NaN"
    elif kind == "inf":
        state["bert.embeddings.LayerNorm.weight"][3] = float("inf")
        message = "LayerNorm.weight' contains 1 NaN or Inf"
    elif kind == "pickle":
        (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
        return bad, "holds only pickle checkpoints \\(pytorch_model.bin\\)"
    elif kind == "truncated":
        save_file(state, str(bad / "model.safetensors"))
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) - 100])
        return bad, "truncated: tensor"
    elif kind == "architecture":
        (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
        message = "architectures differ"
    save_file(state, str(bad / "model.safetensors"))
    return bad, message


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_exit_2_with_a_clear_line_and_leave_nothing(capsys, synthetic_pair, tmp_path, reliability,
                                                                    kind):
    base, tuned = synthetic_pair
    bad, message = corrupt(kind, base, tuned, tmp_path)
    out_dir = tmp_path / "delta"
    code, _, err = run_cli(capsys, *compress_args(base, bad, out_dir, "--method", "truncsvd"))
    assert code == 2
    assert err.startswith("osd-fleet: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not out_dir.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".delta")]
    reliability.refused(BAD_CHECKPOINTS[kind], err)


@pytest.mark.parametrize("args,message", [
    (["--method", "osd"], "needs --calibration"),
    (["--rank", "0"], "rank must be a number > 0, got 0"),
    (["--rank", "-3"], "rank must be a number > 0, got -3"),
    (["--method", "truncsvd", "--rank", "0.5"], "rank must be an integer, got 0.5"),
    (["--extra-rank", "-1"], "extra_rank must be an integer >= 0"),
    (["--method", "magtruncsvd", "--factor-split", "joint"], "factor_split='joint' needs commensurate scores"),
    (["--method", "truncsvd", "--device", "tpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
])
def test_bad_parameters_exit_2(capsys, synthetic_pair, tmp_path, reliability, args, message):
    base, tuned = synthetic_pair
    code, _, err = run_cli(capsys, *compress_args(base, tuned, tmp_path / "d", *args))
    assert code == 2 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "d").exists()
    reliability.refused(f"parameters {' '.join(args)}", err)


@pytest.mark.parametrize("case,content,message", [
    ("empty", "", "holds no rows"),
    ("a row without a label", '{"text": "fine"}\n',
     ":1: expected an object with a string 'text' and an integer 'label'"),
    ("a row that is not JSON", '{"text": "ok", "label": 1}\nnot json\n', ":2: not valid JSON"),
    ("a label outside the head's range", '{"text": "ok", "label": 7}\n',
     "label 7 is outside [0, 2): the model has 2 classes"),
])
def test_bad_calibration_files_exit_2(capsys, real_pair, tmp_path, reliability, case, content, message):
    base, tuned = real_pair
    calib = tmp_path / "calib.jsonl"
    calib.write_text(content)
    code, _, err = run_cli(capsys, *compress_args(base, tuned, tmp_path / "d", "--method", "osd",
                                                  "--calibration", calib))
    assert code == 2 and message in err, err
    assert not (tmp_path / "d").exists()
    reliability.refused(f"calibration file: {case}", err)


def test_existing_output_is_not_overwritten_without_asking(capsys, synthetic_pair, tmp_path, reliability):
    base, tuned = synthetic_pair
    out_dir = tmp_path / "d"
    out_dir.mkdir()
    (out_dir / "precious.txt").write_text("keep me")
    code, _, err = run_cli(capsys, *compress_args(base, tuned, out_dir, "--method", "truncsvd"))
    assert code == 2 and "not empty" in err and (out_dir / "precious.txt").read_text() == "keep me"
    reliability.refused("output directory that already holds files", err)


def test_unknown_method_is_refused_by_the_real_console_script(synthetic_pair, tmp_path, reliability):
    base, tuned = synthetic_pair
    result = subprocess.run([sys.executable, "-m", "osd_cli", *map(str, compress_args(base, tuned, tmp_path / "d")),
                             "--method", "svd++"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice: 'svd++'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "d").exists()
    reliability.refused("unknown method", result.stderr.strip().splitlines()[-1])


def test_nonexistent_base_is_named(capsys, synthetic_pair, tmp_path, reliability):
    _, tuned = synthetic_pair
    code, _, err = run_cli(capsys, *compress_args(tmp_path / "nope", tuned, tmp_path / "d", "--method", "truncsvd"))
    assert code == 2 and "nope: checkpoint directory does not exist" in err
    reliability.refused("base checkpoint directory that does not exist", err)


@pytest.mark.parametrize("side", ["base", "finetuned"])
def test_a_nan_is_blamed_on_the_checkpoint_that_holds_it(capsys, synthetic_pair, tmp_path, side):
    """The delta is checked once; when it fails, the message names the file at fault, not the other."""
    base, tuned = synthetic_pair
    bad = tmp_path / f"bad-{side}"
    shutil.copytree(base if side == "base" else tuned, bad)
    state = load_file(bad / "model.safetensors")
    state["bert.encoder.layer.0.attention.self.key.weight"][1, 2] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    pair = (bad, tuned) if side == "base" else (base, bad)
    code, _, err = run_cli(capsys, *compress_args(*pair, tmp_path / "delta", "--method", "truncsvd"))
    assert code == 2 and f"{bad}: tensor 'bert.encoder.layer.0.attention.self.key.weight' contains 1 NaN" in err, err
