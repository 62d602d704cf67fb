"""melanoma.layout: where a night's rows, summary and bookkeeping live, and the work locations refused."""

from __future__ import annotations

import pytest

from melanoma import layout, storage


def test_a_night_keeps_its_bookkeeping_beside_the_scores_not_inside():
    night = layout.night("s3://b/scores/", "2026-11-25")
    assert night.partition == "s3://b/scores/run_date=2026-11-25"
    assert night.summary == "s3://b/scores/run_date=2026-11-25/_summary.json"
    assert night.work == "s3://b/scores_work/run_date=2026-11-25"
    assert (night.inputs, night.staging, night.checkpoints) == tuple(
        f"s3://b/scores_work/run_date=2026-11-25/{name}" for name in ("inputs.parquet", "staging", "checkpoints")
    )
    assert layout.night("s3://b/scores", "2026-11-25", "s3://other/work/").work == "s3://other/work/run_date=2026-11-25"


def test_a_local_night_works_the_same(tmp_path):
    night = layout.night(str(tmp_path / "scores"), "2026-11-25")
    assert night.work == str(tmp_path / "scores_work" / "run_date=2026-11-25")


@pytest.mark.parametrize(
    "scores, work, message",
    [
        ("s3://b", "", "s3://b: scores at the root of a bucket leave no place beside them for the job's bookkeeping"),
        ("s3://b/scores", "s3://b/scores/work", "s3://b/scores/work: the work location must lie outside the scores dataset"),
        ("s3://b/scores", "s3://b/scores", "s3://b/scores: the work location must lie outside the scores dataset"),
        ("s3://b/scores", "/tmp/work", "/tmp/work: the work location must be on the same storage as the scores"),
    ],
)
def test_a_work_location_that_cannot_hold_the_bookkeeping_is_refused(scores, work, message):
    with pytest.raises(storage.StorageError, match="^" + message.replace("(", r"\(")):
        layout.night(scores, "2026-11-25", work)


def test_a_summary_that_is_not_json_is_one_line(tmp_path):
    storage.write_bytes(layout.summary_uri(str(tmp_path), "2026-11-25"), b"{not json")
    with pytest.raises(storage.StorageError, match=r"_summary.json: the run summary is not valid JSON$"):
        layout.read_summary(str(tmp_path), "2026-11-25")
