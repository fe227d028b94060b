"""The accuracy-versus-size report: the Pareto front, the PNG, the table records and ``catalog plot``.

No Prefect server and no Ray: the report is built from catalog rows alone, as the CLI builds it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import re
import struct

import pytest

from flows.report import (
    ReportError,
    artifact_key,
    comparable_rows,
    finetuned_accuracy,
    pareto_front,
    plot_key,
    plot_png,
    report_markdown,
    table_records,
)
from osd_cli.main import main
from osd_io.catalog import Catalog, CatalogRow
from osd_io.keys import InvalidNameError
from osd_io.storage import open_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = dt.datetime(2026, 11, 23, tzinfo=dt.UTC)


def row(model: str = "m", size: int = 1000, accuracy: float | None = 0.8, *, method: str = "truncsvd", rank: int = 1,
        revision: str = "rev1", eval_data: str = "evalsha", minutes: int = 0, status: str = "ok",
        reference: float | None = 0.9) -> CatalogRow:
    params = {"prefix": "artifacts/x"} | ({} if reference is None else {"finetuned_accuracy": reference})
    return CatalogRow(
        model=model, revision=revision, base="/base", method=method, rank=rank,
        extra_rank=0 if method == "truncsvd" else 1, allocation="uniform", budget_bits=1, paper_bits=1, bytes=size,
        accuracy=accuracy, metric="accuracy", eval_data=eval_data, uri=f"s3://b/fleet/artifacts/{model}/{size}",
        sha256="0" * 64, artifact_id=f"{model}-{method}-{rank}-{size}-{revision}",
        created=T0 + dt.timedelta(minutes=minutes), status=status, params=params,
    )


# --------------------------------------------------------------------------- the Pareto front


@pytest.mark.parametrize(
    ("points", "front"),
    [
        ([], []),
        ([(5, 0.5)], [0]),
        ([(300, 0.9), (100, 0.7), (200, 0.8)], [1, 2, 0]),  # unsorted input, every point on the front
        ([(100, 0.8), (200, 0.7)], [0]),  # larger and worse: dominated
        ([(100, 0.7), (100, 0.8)], [1]),  # equal size: only the more accurate
        ([(200, 0.8), (100, 0.8)], [1]),  # equal accuracy: only the smaller
        ([(100, 0.8), (100, 0.8), (50, 0.6)], [2, 0]),  # exact duplicates: the first
        ([(100, 0.9), (50, 0.6), (400, 0.95), (200, 0.85), (300, 0.9)], [1, 0, 2]),  # staircase
        ([(400, 0.1), (300, 0.2), (200, 0.3), (100, 0.4)], [3]),  # accuracy falling with size
    ],
)
def test_pareto_front_cases(points, front):
    assert pareto_front(points) == front


def test_pareto_front_matches_its_definition_on_random_points_with_ties():
    rng = random.Random(7)
    for _ in range(300):
        points = [(rng.randint(1, 6), rng.randint(0, 5) / 5) for _ in range(rng.randint(1, 9))]
        front = pareto_front(points)
        for i, (size, accuracy) in enumerate(points):
            beaten = any(
                s <= size and a >= accuracy and ((s, a) != (size, accuracy) or j < i)
                for j, (s, a) in enumerate(points) if j != i
            )
            assert (i in front) == (not beaten), (points, front, i)
        assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)


def test_pareto_front_refuses_non_finite_points():
    with pytest.raises(ValueError, match="finite"):
        pareto_front([(100, float("nan"))])
    with pytest.raises(ValueError, match="finite"):
        pareto_front([(float("inf"), 0.5)])


# --------------------------------------------------------------------------- rows, keys, records


def test_comparable_rows_keep_the_newest_revision_and_eval_set():
    rows = [
        row(size=100, revision="old", minutes=0),
        row(size=200, minutes=1),
        row(size=300, eval_data="other", minutes=2),
        row(size=400, minutes=3, accuracy=None),  # unmeasured
        row(size=500, minutes=4, status="failed", accuracy=None),
        row(size=600, minutes=5),
        row("other", size=700, minutes=9),
    ]
    assert [r.bytes for r in comparable_rows(rows, "m")] == [200, 600]
    with pytest.raises(ReportError, match=r"model 'x' is not in the catalog \(models: m, other\)"):
        comparable_rows(rows, "x")
    with pytest.raises(ReportError, match="the catalog is empty"):
        comparable_rows([], "m")
    with pytest.raises(ReportError, match="none of the 1 catalog rows of 'm' has a measured accuracy"):
        comparable_rows([row(accuracy=None)], "m")


def test_keys_are_valid_and_distinct():
    assert artifact_key("osd-fleet-plot", "tiny") == "osd-fleet-plot-tiny"
    names = ("tiny", "Tiny", "run-a.checkpoint-1", "run-a-checkpoint-1")
    keys = {artifact_key("osd-fleet-plot", name) for name in names}
    assert len(keys) == 4 and all(re.fullmatch(r"[a-z0-9-]+", key) for key in keys)
    assert plot_key("run-a.checkpoint-1") == "reports/run-a.checkpoint-1/accuracy-vs-size.png"
    with pytest.raises(InvalidNameError):
        plot_key("../escape")


def test_table_records_say_fraction_of_full_and_which_rows_are_new():
    rows = [row(size=100, accuracy=0.72), row(size=200, accuracy=None, reference=None, status="failed")]
    records = table_records(rows, new={rows[0].artifact_id})
    assert records[0] | {"uri": None} == {
        "model": "m", "method": "truncsvd", "r": 1, "c": 0, "allocation": "uniform", "bytes": 100,
        "accuracy": 0.72, "of_full": 0.8, "status": "ok", "new": True, "artifact": rows[0].artifact_id[:12],
        "uri": None,
    }
    assert records[1]["of_full"] is None and records[1]["new"] is False
    assert table_records(rows[:1], reference=0.8)[0]["of_full"] == 0.9
    assert json.dumps(records)  # JSON-ready, as a table artifact must be
    assert finetuned_accuracy(rows) == 0.9 and finetuned_accuracy(rows[1:]) is None


def test_plot_and_markdown():
    rows = [row(size=100, accuracy=0.6), row(size=300, accuracy=0.7, method="magtruncsvd"),
            row(size=200, accuracy=0.75, method="magtruncsvd", rank=2), row(size=4000, accuracy=0.74)]
    png = plot_png(rows, reference=0.8)
    assert png.startswith(PNG_MAGIC)
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert (width, height) == (750, 480)
    assert plot_png(rows, reference=0.8) == png  # deterministic: the same rows give the same bytes
    text = report_markdown(rows, png, plot_uri="s3://b/fleet/reports/m/accuracy-vs-size.png", store_uri="s3://b/fleet",
                           reference=0.8)
    embedded = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert embedded and base64.b64decode(embedded.group(1)) == png
    table = [line for line in text.splitlines() if line.startswith("| ") and "bytes" not in line]
    assert [line.split(" | ")[0] for line in table] == ["| 100", "| 200"]  # the front only, by size
    assert "osd-fleet catalog plot --model m --store s3://b/fleet" in text
    with pytest.raises(ReportError, match="without a measured accuracy"):
        plot_png([row(accuracy=None)])


# --------------------------------------------------------------------------- osd-fleet catalog plot


def test_catalog_plot_writes_a_png_and_refuses_unknown_models(tmp_path, capsys, monkeypatch):
    store = str(tmp_path / "store")
    out = tmp_path / "plot.png"
    monkeypatch.delenv("OSD_FLEET_STORE", raising=False)
    assert main(["catalog", "plot", "--store", store, "--model", "m", "--out", str(out)]) == 2
    assert "model 'm' is not in the catalog (the catalog is empty)" in capsys.readouterr().err
    assert not out.exists()

    Catalog(open_store(store)).append(
        [row(size=100, accuracy=0.6), row(size=200, accuracy=0.8, minutes=1), row(size=300, accuracy=0.7, minutes=2),
         row("other", size=50)]
    )
    assert main(["catalog", "plot", "--store", store, "--model", "m", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert capsys.readouterr().out.strip() == f"{out}: 3 deltas of m, 2 on the Pareto front"

    assert main(["catalog", "plot", "--store", store, "--model", "nope", "--out", str(out)]) == 2
    assert "model 'nope' is not in the catalog (models: m, other)" in capsys.readouterr().err

    monkeypatch.setenv("OSD_FLEET_STORE", store)  # the default store, as deployments set it
    assert main(["catalog", "plot", "--model", "other", "--out", str(tmp_path / "other.png")]) == 0
    assert main(["catalog", "plot", "--model", "m", "--out", str(tmp_path / "absent" / "m.png")]) == 2
    assert "cannot write" in capsys.readouterr().err
