"""The league table: every peer method's accuracy against real bytes, beside the default's front.

    python bench/quality.py --workloads l6-rt --split eval --ranks 0.25,1,4,16 \\
        --results bench/results/league-l6-rt-eval.jsonl --variants \\
        magtruncsvd-int4-whole4,magtruncsvd-int4-whole4-global,dare-int8,sparse-int8,impart-int8,bitdelta,truncsvd
    python bench/league.py bench/results/league-l6-rt-eval.jsonl [--plot-dir docs/league]

Reads the rows ``bench/quality.py`` wrote (one per variant and budget, with per-row outcomes) and
prints, per workload and split:

* every point: variant, r, real bytes on disk, the fraction of the fp16 dense delta, accuracy;
* the lossless reference, zstd -19 of the fp16 delta, as a bytes-only row;
* each peer point paired with the default's best point at equal or fewer bytes (the default's
  front: its encoding with any allocation, ``FRONT``): the accuracy
  difference (default − peer) on the same rows with its 95% paired-bootstrap interval. A peer
  point smaller than every default point is said to be so, not paired with a larger one;
* the same difference against the default's point nearest in bytes, either side, with the size
  ratio: a peer a few bytes smaller than a default point is otherwise paired with a far smaller one;
* for a decoder (rows with per-row choice losses), a second table: each point's choice loss, the
  share of the fine-tune's loss gain over the base it keeps, and the same pairings on the loss.

With ``--plot-dir`` it also draws accuracy against bytes (log scale), one PNG per workload and
split, with the default's front as a line, and for a decoder the loss gain kept beside it.
Nothing is chosen here: the table only compares.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import paired_difference  # noqa: E402 - bench/ is this script's directory

# The default encoding (int4 values and whole deltas) at the CLI's uniform allocation, with
# --allocation global and with global-all: the points a user gets from the shipped settings at each budget.
FRONT = ("magtruncsvd-int4-whole4", "magtruncsvd-int4-whole4-global", "magtruncsvd-int4-whole4-global-all")


def load_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def gain_kept(row: dict[str, Any]) -> float:
    """The fraction of the fine-tune's choice-loss gain over the base that ``row``'s point keeps."""
    return (row["base_choice_loss"] - row["choice_loss"]) / (row["base_choice_loss"] - row["full_choice_loss"])


def accuracy_difference(default: dict[str, Any], peer: dict[str, Any]) -> tuple[float, ...]:
    return tuple(100 * x for x in paired_difference(default["correct"], peer["correct"]))


def gain_difference(default: dict[str, Any], peer: dict[str, Any]) -> tuple[float, ...]:
    """Peer's loss minus the default's, row by row, as points of the fine-tune's loss gain."""
    gain = default["base_choice_loss"] - default["full_choice_loss"]
    return tuple(100 * x / gain for x in paired_difference(peer["losses"], default["losses"]))


class Measure(NamedTuple):
    """How two points on the same rows are compared: the value the best point has most of, and the
    paired difference (mean and 95% interval), signed so that a positive one favours the default.
    Accuracy compares per-row outcomes; for a decoder the choice loss compares per-row losses, which
    separate points that tie on a few hundred rows' accuracy."""

    unit: str
    value: Callable[[dict[str, Any]], float]
    difference: Callable[[dict[str, Any], dict[str, Any]], tuple[float, ...]]


ACCURACY = Measure("points", lambda row: row["accuracy"], accuracy_difference)
GAIN_KEPT = Measure("points of the loss gain", gain_kept, gain_difference)


def pair_with_default(peer: dict[str, Any], defaults: list[dict[str, Any]], measure: Measure = ACCURACY) -> str:
    """The default's best point at no more bytes than ``peer``, and the paired difference."""
    within = [d for d in defaults if d["bytes"] <= peer["bytes"]]
    if not within:
        smallest = min(defaults, key=lambda d: d["bytes"], default=None)
        return "no default point this small" + (f" (smallest: {smallest['bytes'] / 1e3:,.0f} KB)" if smallest else "")
    return difference(max(within, key=lambda d: (measure.value(d), -d["bytes"])), peer, measure)


def nearest_default(peer: dict[str, Any], defaults: list[dict[str, Any]], measure: Measure = ACCURACY) -> str:
    """The default's point nearest ``peer`` in bytes (by ratio), whichever side: sizes a few bytes
    apart would otherwise pair a peer with a default point a quarter its size."""
    if not defaults:
        return "–"
    chosen = min(defaults, key=lambda d: abs(math.log(d["bytes"] / peer["bytes"])))
    return f"{chosen['bytes'] / peer['bytes']:.2f}× the bytes: " + difference(chosen, peer, measure)


def difference(default: dict[str, Any], peer: dict[str, Any], measure: Measure = ACCURACY) -> str:
    mean, low, high = measure.difference(default, peer)
    verdict = "default ahead" if low > 0 else "peer ahead" if high < 0 else "tie"
    where = "" if default.get("allocation", "uniform") == "uniform" else f" {default['allocation']}"
    return (f"r = {default['r']}{where} ({default['bytes'] / 1e3:,.0f} KB): {mean:+.2f} [{low:+.2f}, "
            f"{high:+.2f}] {measure.unit}, {verdict}")


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    for workload, split in dict.fromkeys((r["workload"], r["split"]) for r in rows):
        group = [r for r in rows if (r["workload"], r["split"]) == (workload, split)]
        first = group[0]
        dense, zstd = first["delta_fp16_bytes"], first["delta_fp16_zstd_bytes"]
        defaults = [r for r in group if r["variant"] in FRONT]
        ordered = sorted(group, key=lambda r: (r["variant"] not in FRONT, r["variant"], r["bytes"]))
        out += [f"**{workload}**, {split} split ({first['n']:,} rows), full fine-tune {first['full_accuracy']:.4f}; "
                f"fp16 dense delta {dense / 1e6:.1f} MB", "",
                "| variant | r | bytes | of fp16 delta | accuracy | of full | the default at ≤ bytes "
                "| the default nearest in bytes |",
                "|---|---:|---:|---:|---:|---:|---|---|",
                f"| zstd -19 of the fp16 delta (lossless) | – | {zstd:,} | 1/{dense / zstd:.2f} | "
                f"{first['full_accuracy']:.4f} | 100.0% | bytes only | |"]
        for row in ordered:
            peer = row["variant"] not in FRONT
            against = pair_with_default(row, defaults) if peer else "–"
            near = nearest_default(row, defaults) if peer else "–"
            out.append(f"| {row['variant']} | {row['r']} | {row['bytes']:,} | 1/{dense / row['bytes']:,.0f} | "
                       f"{row['accuracy']:.4f} | {row['accuracy'] / row['full_accuracy']:.1%} | {against} | {near} |")
        out.append("")
        if all("losses" in r for r in group):
            out += loss_table(ordered, defaults)
    return "\n".join(out)


def loss_table(ordered: list[dict[str, Any]], defaults: list[dict[str, Any]]) -> list[str]:
    """A decoder's second table: each point's choice loss and the share of the fine-tune's loss
    gain it keeps, paired as the accuracy table pairs them."""
    first = ordered[0]
    out = [f"Choice loss on the same rows (fine-tune {first['full_choice_loss']:.4f}, base "
           f"{first['base_choice_loss']:.4f} nats): the share of that gain each point keeps.", "",
           "| variant | r | bytes | choice loss | gain kept | the default at ≤ bytes "
           "| the default nearest in bytes |",
           "|---|---:|---:|---:|---:|---|---|"]
    for row in ordered:
        peer = row["variant"] not in FRONT
        against = pair_with_default(row, defaults, GAIN_KEPT) if peer else "–"
        near = nearest_default(row, defaults, GAIN_KEPT) if peer else "–"
        out.append(f"| {row['variant']} | {row['r']} | {row['bytes']:,} | {row['choice_loss']:.4f} | "
                   f"{gain_kept(row):.1%} | {against} | {near} |")
    return [*out, ""]


def plot(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for workload, split in dict.fromkeys((r["workload"], r["split"]) for r in rows):
        group = [r for r in rows if (r["workload"], r["split"]) == (workload, split)]
        first = group[0]
        panels = [("accuracy", "accuracy", ACCURACY.value, first["full_accuracy"])]
        if all("losses" in r for r in group):
            panels.append(("choice-loss gain kept", "share of the fine-tune's choice-loss gain kept", gain_kept, 1.0))
        figure = Figure(figsize=(7 * len(panels), 4.5))
        FigureCanvasAgg(figure)
        for column, (title, label, value, full) in enumerate(panels, start=1):
            axes = figure.add_subplot(1, len(panels), column)
            for variant in dict.fromkeys(r["variant"] for r in group):
                points = sorted((r for r in group if r["variant"] == variant), key=lambda r: r["bytes"])
                style = "-o" if variant in FRONT else "o"
                axes.plot([p["bytes"] for p in points], [value(p) for p in points], style, label=variant)
            axes.axhline(full, color="grey", linestyle=":", label="full fine-tune")
            axes.axvline(first["delta_fp16_zstd_bytes"], color="grey", linestyle="--", label="zstd fp16 delta")
            axes.set_xscale("log")
            axes.set_xlabel("bytes on disk")
            axes.set_ylabel(f"{label} ({split})")
            axes.set_title(f"{workload}: {title} against bytes")
            axes.legend(fontsize="small")
        path = directory / f"league-{workload}-{split}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="JSONL rows from bench/quality.py")
    parser.add_argument("--plot-dir", type=Path, help="write one accuracy-against-bytes PNG per workload here")
    parser.add_argument("--peers", help="comma-separated peer variants to show (default: every variant in the rows)")
    args = parser.parse_args(argv)
    rows = load_rows(args.results)
    if args.peers:
        shown = {*FRONT, *args.peers.split(",")}
        rows = [r for r in rows if r["variant"] in shown]
    print(table(rows))
    if args.plot_dir:
        for path in plot(rows, args.plot_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
