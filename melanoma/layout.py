"""Where the scores live: the layout the scoring pipeline writes and every reader reads.

  <scores>/run_date=YYYY-MM-DD/*.parquet       the rows, output_schema() below (Hive partitioning)
  <scores>/run_date=YYYY-MM-DD/_summary.json   the run summary, written once the night is complete
  <work>/run_date=YYYY-MM-DD/                  the job's bookkeeping while a night runs (commit.py), then removed
  <scores>_shadow/<version>/run_date=.../      a candidate's rows for the same nights (shadow scoring, promote.py),
  <work>/shadow/<version>/run_date=.../        with bookkeeping of their own: never mixed into <scores>

The bookkeeping (input list, staged files, checkpoints) stays outside the scores dataset, so that a reader
globbing `<scores>/**/*.parquet` sees rows and nothing else. <work> is the sibling prefix `<scores>_work`
unless Settings.work_uri names another place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from melanoma import storage
from melanoma.config import snake_case

PARTITION = "run_date="
SUMMARY = "_summary.json"
WORK_SUFFIX = "_work"
SHADOW_SUFFIX = "_shadow"
# Per-image statistics for the drift watch (melanoma/drift.py): the size the image was decoded at (the long side is
# capped at Settings.max_decoded_side), the mean of each channel in [0, 1] and the sharpness of the model-sized image.
IMAGE_STATS = {
    "image_width": pa.int32(),
    "image_height": pa.int32(),
    "mean_red": pa.float64(),
    "mean_green": pa.float64(),
    "mean_blue": pa.float64(),
    "sharpness": pa.float64(),
}
# Bookkeeping directories that earlier versions kept inside the scores dataset (commit.adopt_legacy moves them).
LEGACY_DIRS = ("_inputs", "_staging", "_checkpoints")


def output_schema(class_names: list[str]) -> pa.Schema:
    """The stable output schema (README: "Output schema")."""
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("image_uri", pa.string()),
            ("sha256", pa.string()),
            ("melanoma_risk", pa.float64()),
            ("flagged", pa.bool_()),
            ("predicted_class", pa.string()),
            *[(f"p_{snake_case(c)}", pa.float64()) for c in class_names],
            ("model_version", pa.string()),
            ("scored_at", pa.timestamp("us", tz="UTC")),
            ("error", pa.string()),
            *IMAGE_STATS.items(),
        ]
    )


def partition(scores_uri: str, run_date: str) -> str:
    return storage.join(scores_uri, f"{PARTITION}{run_date}")


def summary_uri(scores_uri: str, run_date: str) -> str:
    return storage.join(partition(scores_uri, run_date), SUMMARY)


def read_summary(scores_uri: str, run_date: str) -> dict:
    """The night's run summary; StorageError when there is none (the run did not finish) or it is not JSON."""
    uri = summary_uri(scores_uri, run_date)
    try:
        return json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise storage.StorageError(f"{uri}: the run summary is not valid JSON") from None


def work_root(scores_uri: str, override: str = "") -> str:
    """Where the bookkeeping of the scores dataset lives: `override`, else the sibling prefix <scores>_work."""
    scores = storage.join(scores_uri).rstrip("/")
    work = storage.join(override).rstrip("/") if override else scores + WORK_SUFFIX
    if storage.is_s3(scores) and "/" not in scores.removeprefix("s3://") and not override:
        raise storage.StorageError(
            f"{scores_uri}: scores at the root of a bucket leave no place beside them for the job's bookkeeping: "
            f"write them under a prefix (s3://bucket/scores) or set MELANOMA_WORK_URI"
        )
    if storage.is_s3(work) != storage.is_s3(scores):
        raise storage.StorageError(f"{work}: the work location must be on the same storage as the scores {scores_uri}")
    if work == scores or work.startswith(scores + "/"):
        raise storage.StorageError(f"{work}: the work location must lie outside the scores dataset {scores_uri}")
    return work


def shadow_root(scores_uri: str, version: str) -> str:
    """The scores dataset of a candidate scoring beside `latest`: the sibling prefix <scores>_shadow/<version>, which
    a reader of <scores> never sees."""
    scores = storage.join(scores_uri).rstrip("/")
    if storage.is_s3(scores) and "/" not in scores.removeprefix("s3://"):
        raise storage.StorageError(f"{scores_uri}: scores at the root of a bucket leave no place beside them for shadow scores: "
                                   f"write them under a prefix (s3://bucket/scores)")
    return storage.join(scores + SHADOW_SUFFIX, version)


def shadow_work(scores_uri: str, version: str, override: str = "") -> str:
    """The bookkeeping of a shadow run, apart from the main run's nights: <work>/shadow/<version>."""
    return storage.join(work_root(scores_uri, override), "shadow", version)


@dataclass(frozen=True)
class Night:
    """Every location of one night of one scores dataset."""

    scores_uri: str
    run_date: str
    work_root: str

    @property
    def partition(self) -> str:
        return partition(self.scores_uri, self.run_date)

    @property
    def summary(self) -> str:
        return summary_uri(self.scores_uri, self.run_date)

    @property
    def work(self) -> str:
        return storage.join(self.work_root, f"{PARTITION}{self.run_date}")

    @property
    def inputs(self) -> str:
        return storage.join(self.work, "inputs.parquet")

    @property
    def staging(self) -> str:
        return storage.join(self.work, "staging")

    @property
    def checkpoints(self) -> str:
        return storage.join(self.work, "checkpoints")


def night(scores_uri: str, run_date: str, work_uri: str = "") -> Night:
    return Night(scores_uri, run_date, work_root(scores_uri, work_uri))
