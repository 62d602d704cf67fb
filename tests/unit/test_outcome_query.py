"""melanoma.query with an outcome store, on two nights written here in the scorer's schema: how scored rows match
outcomes (sha256 before image_id), the realised figures worked out by hand, and the missed melanomas."""

from __future__ import annotations

import hashlib
from datetime import date, datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from melanoma import cli, layout, outcomes, query, report
from melanoma.config import CLASS_NAMES, MELANOMA, snake_case

NIGHTS = ("2026-11-26", "2026-11-27")
VERSION = "20261125-000000-tiny"


def sha(image_id: str) -> str:
    return hashlib.sha256(image_id.encode()).hexdigest()


def scored(image_id: str, risk: float | None) -> dict:
    """A row as the scorer writes it, flagged at 0.5; risk None is a row that could not be scored."""
    return {
        "image_id": image_id, "image_uri": f"/gone/archive/{image_id}.jpg", "sha256": sha(image_id),
        "melanoma_risk": risk, "flagged": None if risk is None else risk >= 0.5,
        "predicted_class": None if risk is None else MELANOMA,
        **{f"p_{snake_case(c)}": None if risk is None else (risk if c == MELANOMA else 0.0) for c in CLASS_NAMES},
        "model_version": VERSION, "scored_at": datetime(2026, 11, 26, 3, tzinfo=timezone.utc),
        "error": "empty file (0 bytes)" if risk is None else None,
    }  # fmt: skip


@pytest.fixture
def scores(tmp_path) -> str:
    nights = {
        NIGHTS[0]: [scored("a", 0.9), scored("b", 0.7), scored("c", 0.4), scored("d", 0.2), scored("e", None), scored("g", 0.8)],
        NIGHTS[1]: [scored("a", 0.3), scored("d", 0.6)],
    }
    schema = layout.output_schema(list(CLASS_NAMES))
    for night, rows in nights.items():
        (tmp_path / "scores" / f"run_date={night}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "scores" / f"run_date={night}" / "part-0.parquet")
    return str(tmp_path / "scores")


@pytest.fixture
def store(tmp_path) -> str:
    csv = tmp_path / "outcomes.csv"
    csv.write_text("\n".join([
        "image_id,sha256,diagnosis,melanoma,confirmed_on,note",
        f",{sha('a')},melanoma,,2026-11-30,by its content only",
        "b,,nevus,,2026-11-30,by its id only",
        f"c,{sha('c')},,yes,2026-11-30,",
        "d,,,no,2026-11-30,",
        "e,,melanoma,,2026-11-30,could not be scored",
        f"g,{sha('another picture')},melanoma,,2026-11-30,same id other content",
        "f,,melanoma,,2026-11-30,never scored",
    ]) + "\n")
    outcomes.add(str(csv), str(tmp_path / "store"))
    return str(tmp_path / "store")


def test_realised_figures_per_night_and_model_version(scores, store):
    missed, figures = query.realised(scores, store)

    rows = [{k: v for k, v in r.items() if k != "model_version"} for r in figures.to_pylist()]
    assert rows == [
        # a, c melanomas; b, d not; a and b flagged. AUC: 0.9 > 0.7, 0.2; 0.4 > 0.2 only -> 3/4
        {"run_date": date(2026, 11, 26), "confirmed": 4, "melanomas": 2, "flagged": 2, "missed": 1,
         "sensitivity": 0.5, "specificity": 0.5, "auc": 0.75},
        # a (0.3) missed, d (0.6) flagged
        {"run_date": date(2026, 11, 27), "confirmed": 2, "melanomas": 1, "flagged": 1, "missed": 1,
         "sensitivity": 0.0, "specificity": 0.0, "auc": 0.0},
        # both nights: melanomas 0.9, 0.4, 0.3 against 0.7, 0.2, 0.6 -> 5 of 9 pairs
        {"run_date": None, "confirmed": 6, "melanomas": 3, "flagged": 3, "missed": 2,
         "sensitivity": pytest.approx(1 / 3), "specificity": pytest.approx(1 / 3), "auc": pytest.approx(5 / 9)},
    ]  # fmt: skip
    assert set(figures.column("model_version").to_pylist()) == {VERSION}
    assert [(str(r["run_date"]), r["image_id"], r["melanoma_risk"], r["diagnosis"]) for r in missed.to_pylist()] == [
        (NIGHTS[1], "a", 0.3, MELANOMA), (NIGHTS[0], "c", 0.4, None),
    ]  # fmt: skip


def test_a_night_range_and_the_confirmed_view(scores, store):
    missed, figures = query.realised(scores, store, since=NIGHTS[1])
    assert [str(d) for d in figures.column("run_date").to_pylist()] == [NIGHTS[1], "None"]
    assert missed.column("image_id").to_pylist() == ["a"]

    matched = query.sql(scores, "SELECT image_id, note FROM confirmed WHERE run_date = '2026-11-26' ORDER BY 1", store)
    assert matched.to_pylist() == [
        {"image_id": "a", "note": "by its content only"}, {"image_id": "b", "note": "by its id only"},
        {"image_id": "c", "note": None}, {"image_id": "d", "note": None},
    ]  # fmt: skip


def test_no_outcomes_yet_gives_empty_tables(scores, tmp_path):
    missed, figures = query.realised(scores, str(tmp_path / "no-store"))
    assert missed.num_rows == 0 and figures.num_rows == 0
    assert figures.column_names[-3:] == ["sensitivity", "specificity", "auc"]


def test_the_morning_report_shows_the_confirmed_diagnoses_up_to_its_night(scores, store, tmp_path):
    out = tmp_path / "report.html"
    report.morning_report(scores, NIGHTS[0], str(out), outcomes_uri=store)
    page = out.read_text()
    section = page[page.index('<section id="outcomes">') : page.index('<section id="distribution">')]
    assert "Missed melanomas: confirmed melanoma, not flagged (1)" in section
    assert "<td>c</td>" in section and "<td>a</td>" not in section  # a was missed on the later night only
    assert section.count("<tr>") == 1 + 1 + 1 + 2  # header, c; header, the night and all nights
    assert "<td>all nights</td>" in section and '<td class="num">0.750</td>' in section

    report.morning_report(scores, NIGHTS[0], str(out))
    assert 'id="outcomes"' not in out.read_text()
    report.morning_report(scores, NIGHTS[0], str(out), outcomes_uri=str(tmp_path / "empty"))
    assert "No confirmed diagnosis matches these scores yet." in out.read_text()


@pytest.mark.parametrize("argv", [
    ["query", "S", "--outcomes", "O", "--format", "csv"],
    ["query", "S", "--outcomes", "O", "--flagged"],
    ["report", "--model", "M", "--outcomes", "O", "--out", "x.html"],
    ["outcomes", "add", "x.csv"],
])  # fmt: skip
def test_outcome_flags_that_do_not_go_together_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2 and "error:" in capsys.readouterr().err


def test_the_cli_prints_missed_then_realised_and_refuses_bad_csvs(scores, store, tmp_path, capsys):
    assert cli.main(["query", scores, "--outcomes", store, "--date", NIGHTS[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "missed melanomas (confirmed melanoma, not flagged): 1"
    assert lines.index("realised per night and model version (no run_date: all those nights)") == 6
    csv = tmp_path / "bad.csv"
    csv.write_text("image_id,melanoma,confirmed_on\na,yes,2026-11-30\nb,perhaps,2026-11-30\n")
    assert cli.main(["outcomes", "add", str(csv), "--store", str(tmp_path / "new")]) == 1
    assert capsys.readouterr().err.splitlines()[1] == f"{csv} line 3: melanoma must be yes, no, 1 or 0, got 'perhaps'"
    assert not (tmp_path / "new").exists()
