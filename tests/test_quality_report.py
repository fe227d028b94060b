"""The quality benchmark's report: paired differences with intervals, from its own result rows."""

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "bench" / "quality.py")
quality = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(quality)
_SPEC = importlib.util.spec_from_file_location("league", Path(__file__).parents[1] / "bench" / "league.py")
league = importlib.util.module_from_spec(_SPEC)  # it puts bench/ on the path to import quality, as when run
_SPEC.loader.exec_module(league)


def test_paired_difference_is_the_accuracy_gap_with_an_interval_around_it():
    mean, low, high = quality.paired_difference("1" * 90 + "0" * 10, "1" * 80 + "0" * 20)
    assert mean == pytest.approx(0.10) and low < 0.10 < high and low > 0  # ten more rows right, none fewer
    assert quality.paired_difference("10" * 500, "10" * 500) == (0.0, 0.0, 0.0)
    mean, low, high = quality.paired_difference("10" * 500, "01" * 500)  # same accuracy, every row differs
    assert mean == 0.0 and low < -0.05 and high > 0.05
    with pytest.raises(ValueError, match="same rows, got 3 and 2"):
        quality.paired_difference("101", "10")
    mean, low, high = quality.paired_difference([0.5, 0.25, 1.0, 0.75], [0.25, 0.25, 0.5, 0.5])  # per-row losses
    assert mean == pytest.approx(0.25) and 0 <= low <= 0.25 <= high <= 0.5


def test_report_tables_each_variant_and_its_difference_from_the_reference(tmp_path):
    common = {"workload": "w", "split": "eval", "r": 1, "c": 3, "n": 100, "full_accuracy": 0.9, "bytes": 1000,
              "finetuned_bytes": 9e6, "delta_fp16_bytes": 4e6, "delta_fp16_zstd_bytes": 3e6}
    rows = [
        {**common, "variant": "magtruncsvd-int8", "accuracy": 0.8, "correct": "1" * 80 + "0" * 20},
        {**common, "variant": "osd-taylor-int8", "accuracy": 0.7, "correct": "1" * 70 + "0" * 30},
        {**common, "variant": "truncsvd", "accuracy": 0.5, "c": 0},  # an older row: no per-row outcomes
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = quality.report(path)
    assert "| osd-taylor-int8 | 0.7000 (77.8%, 1 KB, c=3) |" in text
    assert "Difference from `magtruncsvd-int8`" in text
    line = next(line for line in text.splitlines() if line.startswith("| osd-taylor-int8 | -10.00 ["))
    low, high = (float(x) for x in line.split("[")[1].split("]")[0].split(","))
    assert low < -10 < high < 0  # ten rows fewer right, none more: a real gap
    assert "| truncsvd | – |" in text
    # two rows of one variant at one r (c swept, or a rerun appended): no pairing is guessed
    path.write_text(path.read_text() + json.dumps({**rows[1], "c": 5}) + "\n")
    assert "| osd-taylor-int8 | – |" in quality.report(path)


def test_league_pairs_each_peer_with_the_best_default_point_at_no_more_bytes(tmp_path, capsys):
    common = {"workload": "w", "split": "eval", "n": 100, "full_accuracy": 0.9,
              "delta_fp16_bytes": 4_000_000, "delta_fp16_zstd_bytes": 3_000_000}
    def point(variant: str, r: float, size: int, right: int) -> dict:
        return {**common, "variant": variant, "r": r, "bytes": size, "accuracy": right / 100,
                "correct": "1" * right + "0" * (100 - right)}

    rows = [point("magtruncsvd-int4-whole4", 1, 10_000, 80), point("magtruncsvd-int4-whole4-global", 4, 40_000, 85),
            {**point("magtruncsvd-int4-whole4-global-all", 0.5, 8_000, 81), "allocation": "global-all"},
            point("dare-int8", 4, 30_000, 60), point("bitdelta", 1, 5_000, 70)]
    text = league.table(rows)
    assert "| zstd -19 of the fp16 delta (lossless) | – | 3,000,000 | 1/1.33 |" in text
    dare = next(line for line in text.splitlines() if line.startswith("| dare-int8 |"))
    # the front's best point within its bytes: not the r = 4 point (more bytes), not r = 1 (less accurate)
    assert "r = 0.5 global-all (8 KB): +21.00 [" in dare and dare.endswith("default ahead |")
    bitdelta = next(line for line in text.splitlines() if line.startswith("| bitdelta |"))
    assert "no default point this small (smallest: 8 KB)" in bitdelta
    (png,) = league.plot(rows, tmp_path)
    assert png.name == "league-w-eval.png" and png.read_bytes()[:4] == b"\x89PNG"
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert league.main([str(path), "--peers", "dare-int8"]) == 0
    shown = capsys.readouterr().out
    assert "| dare-int8 |" in shown and "| bitdelta |" not in shown and "| magtruncsvd-int4-whole4 |" in shown


def test_a_decoder_league_pairs_the_choice_loss_as_a_share_of_the_fine_tunes_gain(tmp_path):
    common = {"workload": "lm", "split": "eval", "n": 4, "full_accuracy": 0.75, "delta_fp16_bytes": 4_000_000,
              "delta_fp16_zstd_bytes": 3_000_000, "base_choice_loss": 0.7, "full_choice_loss": 0.3,
              "correct": "1110", "accuracy": 0.75}

    def point(variant: str, size: int, losses: list[float]) -> dict:
        return {**common, "variant": variant, "r": 1, "bytes": size, "losses": losses,
                "choice_loss": sum(losses) / len(losses)}

    rows = [point("magtruncsvd-int4-whole4", 10_000, [0.3, 0.3, 0.4, 0.6]),  # loss 0.4: 75% of the gain
            point("deltacome-whole4", 12_000, [0.5, 0.5, 0.6, 0.8])]  # loss 0.6: 25%, and worse on every row
    text = league.table(rows)
    assert "Choice loss on the same rows (fine-tune 0.3000, base 0.7000 nats)" in text
    peer = next(line for line in text.splitlines() if line.startswith("| deltacome-whole4 | 1 | 12,000 | 0.6000 |"))
    assert "| 25.0% |" in peer
    # equal accuracy on the four rows is a tie; the loss separates them: 0.2 nats of a 0.4 gain, 50 points
    assert "r = 1 (10 KB): +0.00 [+0.00, +0.00] points, tie" in text
    assert "r = 1 (10 KB): +50.00 [+50.00, +50.00] points of the loss gain, default ahead" in peer
    (png,) = league.plot(rows, tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"
