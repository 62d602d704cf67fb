"""melanoma.commit on local files: adopting an earlier layout, finishing cut checkpoint commits, promoting a night.
The same protocol on S3 under a real pipeline: tests/integration/test_score.py and test_reliability.py."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from melanoma import commit, layout

NIGHT = "2026-11-25"


def rows(uris: list[str], scored_at: datetime) -> pa.Table:
    return pa.table({
        "image_uri": uris, "flagged": [True] + [False] * (len(uris) - 1), "error": [None] * len(uris),
        "scored_at": pa.array([scored_at] * len(uris), pa.timestamp("us", tz="UTC")),
    })  # fmt: skip


def test_an_earlier_layout_is_moved_out_once_and_the_night_promoted(tmp_path, caplog):
    scores = tmp_path / "scores"
    earlier = datetime.now(timezone.utc) - timedelta(hours=1)
    for sub, name in (("_staging", "part-1.parquet"), ("_checkpoints", "block-1.parquet"), ("_inputs", "inputs.parquet")):
        (scores / sub / f"run_date={NIGHT}").mkdir(parents=True)
        pq.write_table(rows(["a.jpg", "b.jpg"], earlier), scores / sub / f"run_date={NIGHT}" / name)
    (scores / f"run_date={NIGHT}").mkdir()
    pq.write_table(rows(["c.jpg"], earlier), scores / f"run_date={NIGHT}" / "part-0.parquet")
    night = layout.night(str(scores), NIGHT)

    with caplog.at_level(logging.WARNING, logger="melanoma.commit"):
        assert commit.adopt_legacy(night) == 2
        assert commit.adopt_legacy(night) == 0
    assert len(caplog.records) == 1 and "_inputs, _staging, _checkpoints: 2 staged or checkpoint files" in caplog.text
    assert sorted(p.name for p in scores.iterdir()) == [f"run_date={NIGHT}"]
    assert (tmp_path / "scores_work" / f"run_date={NIGHT}" / "staging" / "part-1.parquet").exists()
    assert (tmp_path / "scores_work" / f"run_date={NIGHT}" / "checkpoints" / "block-1.parquet").exists()
    assert commit.already_scored(night) == {"c.jpg"}

    started = datetime.now(timezone.utc)
    summary = commit.finish(night, {"run_date": NIGHT}, started)
    assert summary["files_written"] == 1 and summary["rows"] == summary["unique_images"] == 3
    assert summary["scored_this_run"] == 0 and summary["flagged"] == 2
    assert layout.read_summary(str(scores), NIGHT) == summary
    assert not (tmp_path / "scores_work").exists()


def test_a_checkpoint_commit_cut_between_copy_and_delete_is_finished(tmp_path):
    night = layout.night(str(tmp_path / "scores"), NIGHT)
    checkpoints = tmp_path / "scores_work" / f"run_date={NIGHT}" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name in ("cut.parquet", "cut.pending.parquet", "open.pending.parquet", "done.parquet"):
        (checkpoints / name).write_bytes(b"ids")
    assert commit.finish_interrupted_commits(night) == 1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["cut.parquet", "done.parquet", "open.pending.parquet"]
