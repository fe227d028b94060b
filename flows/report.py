"""Accuracy versus size of a model's catalogued deltas: the Pareto front, a PNG plot, table records.

Why a module of its own: every compress flow run publishes this view as Prefect artifacts, and
``osd-fleet catalog plot`` draws the same figure from any catalog, with no Prefect server. So
nothing here imports Prefect; matplotlib is imported on use and drives its Agg canvas directly
(no pyplot state, no display), which is safe in flow processes and threads.

The plot compares like with like: the rows of one revision of the model, scored on one eval set
with one metric (those of its newest measured row), since accuracies on different data or of
different fine-tunes do not compare. The reference line is the full fine-tune's accuracy on the
same eval set, recorded by the pipeline in each row's ``params["finetuned_accuracy"]``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from osd_io.catalog import CatalogError, CatalogRow
from osd_io.keys import safe_name

__all__ = [
    "PLOT_NAME",
    "ReportError",
    "artifact_key",
    "comparable_rows",
    "finetuned_accuracy",
    "pareto_front",
    "plot_key",
    "plot_png",
    "report_markdown",
    "table_records",
]

PLOT_NAME = "accuracy-vs-size.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LOG_X_RATIO = 10.0  # a log size axis once the largest delta is 10x the smallest


class ReportError(CatalogError):
    """The catalog holds nothing to plot for the model; the message says why."""


def artifact_key(kind: str, model: str) -> str:
    """A Prefect artifact key for ``model`` (lowercase letters, digits and dashes only).

    Keys give each model its own history on the UI's Artifacts page. A name that had to be
    changed to fit carries a short hash of itself, so ``Tiny`` and ``tiny`` keep apart.
    """
    slug = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
    if slug != model:
        slug = f"{slug}-{hashlib.sha256(model.encode()).hexdigest()[:8]}".lstrip("-")
    return f"{kind}-{slug}"


def plot_key(model: str) -> str:
    """Where the model's plot is stored, next to the catalog: one object per model, replaced each run."""
    return f"reports/{safe_name(model)}/{PLOT_NAME}"


def pareto_front(points: Sequence[tuple[float, float]], *, higher_is_better: bool = True) -> list[int]:
    """Indices of the (size, score) points no other point beats, by increasing size.

    A point is on the front when every smaller-or-equal point scores worse: for each score it
    reaches, it is the smallest delta that reaches it (better is lower for perplexity). Of equal
    points the first is kept.
    """
    for size, accuracy in points:
        if not (math.isfinite(size) and math.isfinite(accuracy)):
            raise ValueError(f"points must be finite (size, accuracy) pairs, got ({size!r}, {accuracy!r})")
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def comparable_rows(rows: Sequence[CatalogRow], model: str) -> list[CatalogRow]:
    """The model's successful, measured rows that compare with its newest one (revision, eval set, metric)."""
    mine = [row for row in rows if row.model == model]
    if not mine:
        known = sorted({row.model for row in rows})
        listed = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
        raise ReportError(
            f"model {model!r} is not in the catalog" + (f" (models: {listed})" if known else " (the catalog is empty)")
        )
    measured = [row for row in mine if row.status == "ok" and row.accuracy is not None]
    if not measured:
        raise ReportError(
            f"none of the {len(mine)} catalog rows of {model!r} has a measured accuracy "
            "(compress with eval data: --eval)"
        )
    newest = max(measured, key=lambda row: row.created)
    same = (newest.revision, newest.eval_data, newest.metric)
    return [row for row in measured if (row.revision, row.eval_data, row.metric) == same]


def finetuned_accuracy(rows: Sequence[CatalogRow]) -> float | None:
    """The full fine-tune's accuracy the newest of ``rows`` records (None when none was measured)."""
    for row in sorted(rows, key=lambda r: r.created, reverse=True):
        value = row.params_dict.get("finetuned_accuracy")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def is_png(path: Path) -> bool:
    """Whether ``path`` starts with the PNG signature (so a plot may replace it)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(8) == PNG_SIGNATURE
    except OSError:
        return False


def plot_png(rows: Sequence[CatalogRow], *, reference: float | None = None) -> bytes:
    """Accuracy against bytes on storage, one point per row, the Pareto front drawn as a staircase.

    ``rows`` are one model's comparable rows (:func:`comparable_rows`); ``reference`` is the full
    fine-tune's accuracy, drawn as a dashed line. The staircase reads: the best accuracy any
    delta of at most this size reaches.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    points = _points(rows)
    front = pareto_front(points, higher_is_better=rows[0].higher_is_better)
    figure = Figure(figsize=(7.5, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    groups: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.method, row.allocation), []).append(i)
    markers = "osD^vP*X"
    for number, ((method, allocation), members) in enumerate(sorted(groups.items())):
        axes.scatter(
            [points[i][0] for i in members],
            [points[i][1] for i in members],
            marker=markers[number % len(markers)],
            s=36,
            zorder=3,
            label=f"{method} ({allocation})",
        )
    xs, ys = [points[i][0] for i in front], [points[i][1] for i in front]
    axes.step(xs, ys, where="post", color="black", linewidth=1.2, zorder=2, label="Pareto front")
    axes.scatter(xs, ys, s=120, facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)
    for i in front:
        row = rows[i]
        axes.annotate(
            f"r={row.rank}+{row.extra_rank}" if row.method != "truncsvd" else f"r={row.rank}",
            points[i],
            textcoords="offset points",
            xytext=(6, -12),
            fontsize=8,
        )
    if reference is not None:
        axes.axhline(reference, color="gray", linestyle="--", linewidth=1, label=f"full fine-tune {reference:.4f}")
    sizes = [p[0] for p in points]
    log_x = min(sizes) > 0 and max(sizes) / min(sizes) >= _LOG_X_RATIO
    if log_x:
        axes.set_xscale("log")
    axes.xaxis.set_major_formatter(EngFormatter(unit="B"))
    axes.margins(x=0.08)  # room for the labels of the outermost points
    first = rows[0]
    axes.set_xlabel("delta size on storage" + (" (log scale)" if log_x else ""))
    axes.set_ylabel(f"{first.metric} on the eval set")
    axes.set_title(f"{first.model} (revision {first.revision}): {len(rows)} deltas", fontsize=11)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    sink = io.BytesIO()
    figure.savefig(sink, format="png", metadata={"Software": None})  # no version stamp: same rows, same bytes
    return sink.getvalue()


def table_records(
    rows: Sequence[CatalogRow], *, new: Collection[str] = (), reference: float | None = None
) -> list[dict[str, Any]]:
    """One JSON-ready record per row for a table artifact: what a reader compares, no credentials.

    ``new`` holds the artifact ids this run compressed (the others were already catalogued);
    ``of_full`` is accuracy over ``reference`` (else over the row's own recorded reference).
    """
    records = []
    for row in rows:
        full = reference if reference is not None else finetuned_accuracy([row])
        of_full = row.accuracy / full if row.accuracy is not None and full else None
        records.append(
            {
                "model": row.model,
                "method": row.method,
                "r": row.rank,
                "c": row.extra_rank,
                "allocation": row.allocation,
                "bytes": row.bytes,
                "accuracy": None if row.accuracy is None else round(row.accuracy, 4),
                "of_full": None if of_full is None else round(of_full, 4),
                "status": row.status,
                "new": row.artifact_id in new,
                "artifact": row.artifact_id[:12],
                "uri": row.uri,
            }
        )
    return records


def report_markdown(
    rows: Sequence[CatalogRow], png: bytes, *, plot_uri: str, store_uri: str, reference: float | None = None
) -> str:
    """A markdown report: the plot embedded as a data URI, the Pareto front as a table, where the PNG is.

    Both Prefect UIs render ``data:image/...`` sources in markdown images (checked in the 3.8.8 UI
    bundles), and an object-store URI is not something a browser can open: so the image travels
    inside the artifact, and the stored copy is for people and tools with store access.
    """
    first = rows[0]
    front = [rows[i] for i in pareto_front(_points(rows), higher_is_better=rows[0].higher_is_better)]
    encoded = base64.b64encode(png).decode("ascii")
    full = f"full fine-tune {reference:.4f}" if reference is not None else "full fine-tune not measured"
    lines = [
        f"### {first.model}: {first.metric} versus size",
        "",
        f"![{first.metric} versus size of {first.model}](data:image/png;base64,{encoded})",
        "",
        f"{len(rows)} deltas of revision `{first.revision}`; {full}. "
        "Pareto front (the smallest delta for each accuracy it reaches):",
        "",
        f"| bytes | {first.metric} | of full | method | r | c | allocation | artifact |",
        "|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for row in front:
        of_full = f"{row.accuracy / reference:.3f}" if reference and row.accuracy is not None else "-"
        lines.append(
            f"| {row.bytes:,} | {row.accuracy:.4f} | {of_full} | {row.method} | {row.rank} | {row.extra_rank} "
            f"| {row.allocation} | `{row.artifact_id[:12]}` |"
        )
    lines += [
        "",
        f"PNG: `{plot_uri}`. Redraw: `osd-fleet catalog plot --model {first.model} --store {store_uri} "
        f"--out {first.model}.png`",
    ]
    return "\n".join(lines)


def _points(rows: Sequence[CatalogRow]) -> list[tuple[float, float]]:
    if not rows:
        raise ReportError("nothing to plot: no rows")
    unmeasured = [row.artifact_id[:12] for row in rows if row.accuracy is None]
    if unmeasured:
        raise ReportError(f"rows without a measured accuracy cannot be plotted: {', '.join(unmeasured)}")
    return [(float(row.bytes), float(row.accuracy)) for row in rows]  # type: ignore[arg-type]
