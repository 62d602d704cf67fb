"""melanoma.query.runs: one row per finished night, read from the run summaries, with the drift figures."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from melanoma import query


def _summary(path, **fields) -> None:
    path.mkdir(parents=True)
    (path / "_summary.json").write_text(json.dumps({"rows": 10, "scored": 8, "errors": 2, "flagged": 2, "model_version": "v1"} | fields))


def _drift(alert: bool, reasons: list[str]) -> dict:
    figure = {"psi": 0.5 if alert else 0.01, "shifted": alert}
    return {
        "alert": alert, "reasons": reasons, "reference": "v1", "images": 8,
        "features": {name: figure for name in query.RUN_FIGURES},
        "flagged_share": {"psi": 0.02}, "class_mix": {"psi": 0.03},
    }  # fmt: skip


@pytest.fixture
def scores(tmp_path):
    _summary(tmp_path / "run_date=2026-11-26", drift=_drift(False, []))
    _summary(tmp_path / "run_date=2026-11-27", drift=_drift(True, ["brightness fell: mean 0.3 vs 0.5", "sharpness fell"]))
    _summary(tmp_path / "run_date=2026-11-28", drift={"alert": False, "reasons": [], "reference": None, "images": 8})
    _summary(tmp_path / "run_date=2026-11-29")  # scored before the drift watch
    (tmp_path / "run_date=2026-11-30").mkdir()  # still running: no summary yet
    return str(tmp_path)


def test_runs_lists_finished_nights_with_their_drift(scores):
    table = query.runs(scores)
    assert table.schema == query.RUNS_SCHEMA
    rows = table.to_pylist()
    assert [r["run_date"] for r in rows] == [dt.date(2026, 11, d) for d in (26, 27, 28, 29)]
    assert [r["drift_alert"] for r in rows] == [False, True, None, None]
    assert rows[1]["drift_reasons"] == "brightness fell: mean 0.3 vs 0.5; sharpness fell"
    assert rows[1]["psi_brightness"] == 0.5 and rows[1]["psi_class_mix"] == 0.03
    assert rows[2]["psi_brightness"] is None and rows[2]["drift_reasons"] is None
    assert rows[0]["flagged_share"] == 0.25 and rows[0]["images"] == 10


def test_runs_in_a_range_and_as_text(scores):
    assert query.runs(scores, since="2026-11-27", until="2026-11-28").column("run_date").to_pylist() == [
        dt.date(2026, 11, 27), dt.date(2026, 11, 28)
    ]  # fmt: skip
    text = query.format_table(query.runs(scores), "table")
    assert "brightness fell: mean 0.3 vs 0.5; sharpness fell" in text and text.endswith("(4 rows)")
    with pytest.raises(query.QueryError, match="no night between 2027-01-01 and the last"):
        query.runs(scores, since="2027-01-01")


def test_the_cli_lists_runs(scores, capsys):
    from melanoma import cli

    assert cli.main(["query", scores, "--runs", "--date", "2026-11-27", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('"run_date","model_version","images"') and len(lines) == 2
    assert '"brightness fell: mean 0.3 vs 0.5; sharpness fell"' in lines[1]
    with pytest.raises(SystemExit) as usage:
        cli.main(["query", scores, "--runs", "--flagged"])
    assert usage.value.code == 2
    assert "--runs takes only --date, --since and --until" in capsys.readouterr().err
