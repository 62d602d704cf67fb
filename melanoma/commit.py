"""The commit protocol: every image of a night lands in <scores>/run_date=D/ exactly once, whatever stops a run.

  adopt_legacy       bookkeeping an earlier version kept inside the scores dataset moves to <work> (once)
  already_scored     images already in the partition are not listed again
  start              the night's input list -> <work>/run_date=D/inputs.parquet, interrupted commits finished
      ... the pipeline (score.py) writes files to <work>/run_date=D/staging/, Ray Data checkpoints each written
          block in <work>/run_date=D/checkpoints/ (its checkpoint filter skips those rows in a rerun)
  finish             staged files move into run_date=D/, the bookkeeping is dropped, the summary is written last

A rerun after a crash at any point scores only what is missing. Readers of run_date=D/ never see a half-written
file: a local file appears by rename, an S3 object by a complete PUT or copy.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone

import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from melanoma import ray_adapter, storage
from melanoma.layout import LEGACY_DIRS, Night

log = logging.getLogger(__name__)


def _explained(fn):
    """pyarrow's OSError (an S3 call that failed after its retries) as a one-line StorageError naming the scores."""

    @functools.wraps(fn)
    def wrapper(night: Night, *args, **kwargs):
        try:
            return fn(night, *args, **kwargs)
        except OSError as exc:
            raise storage.explain(night.scores_uri, exc) from None

    return wrapper


@_explained
def adopt_legacy(night: Night) -> int:
    """Moves the staged files and checkpoints of every night that an earlier version left under <scores>/_staging
    and <scores>/_checkpoints to <work>, where a rerun of that night resumes from them; drops <scores>/_inputs
    (input lists, rewritten by every run). Returns the number of files moved."""
    fs, root = storage.pyarrow_fs(night.scores_uri)
    _, work = storage.pyarrow_fs(night.work_root)
    entries = {e.base_name for e in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
    found = [d for d in LEGACY_DIRS if d in entries]
    moved = 0
    for name in found:
        if name != "_inputs":
            for f in _files(fs, f"{root}/{name}", recursive=True):
                night_dir, _, base = f.path[len(root) + len(name) + 2 :].partition("/")
                fs.create_dir(f"{work}/{night_dir}/{name[1:]}", recursive=True)
                fs.move(f.path, f"{work}/{night_dir}/{name[1:]}/{base}")
                moved += 1
        fs.delete_dir(f"{root}/{name}")
    if found:
        log.warning(
            "%s: moved the bookkeeping an earlier version kept in the scores dataset (%s: %d staged or checkpoint "
            "files) to %s; the input lists were dropped", night.scores_uri, ", ".join(found), moved, night.work_root,
        )  # fmt: skip
    return moved


@_explained
def already_scored(night: Night) -> set[str]:
    fs, path = storage.pyarrow_fs(night.partition)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_uri"])
    return set(table.column("image_uri").to_pylist())


@_explained
def start(night: Night, todo: pd.DataFrame) -> None:
    """Writes the input list the pipeline reads, and finishes the checkpoint commits a crash cut short."""
    storage.write_parquet(night.inputs, todo)
    finish_interrupted_commits(night)


def finish_interrupted_commits(night: Night) -> int:
    """Ray Data commits a written block by moving <id>.pending.parquet to <id>.parquet. On S3 a move is a copy and
    then a delete: a crash between the two (S3 or the worker killed) leaves both files, and Ray Data's recovery then
    deletes the block's data files (pending = unfinished) while the committed file keeps its rows out of the rerun:
    the block is lost. Both files mean the copy was made, which happens only once the data files are written, so the
    commit is finished here, before the rerun's recovery sees it (Ray Data's own commit treats this state the same)."""
    fs, path = storage.pyarrow_fs(night.checkpoints)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return 0
    finished = ray_adapter.interrupted_commits({f.base_name for f in _files(fs, path)})
    for name in finished:
        fs.delete_file(f"{path}/{name}")
    if finished:
        log.warning("%s: finished %d checkpoint commit(s) cut between copy and delete", night.checkpoints, len(finished))
    return len(finished)


@_explained
def finish(night: Night, facts: dict, started: datetime, measure: Callable[[str], dict] | None = None) -> dict:
    """Promotes the staged files, drops the night's bookkeeping, then writes the run summary (facts, the counts read
    back from the partition, and what measure(partition uri) reads from the complete night) and returns it."""
    promoted = _promote(night)
    # the subdirectories first: SeaweedFS still answers for a directory whose subdirectories went with it
    for uri in (night.staging, night.checkpoints, night.work):
        storage.delete_dir(uri)
    if not storage.is_s3(night.work_root):
        with contextlib.suppress(OSError):  # an empty local directory is all that is left (S3 keeps none)
            os.rmdir(storage.pyarrow_fs(night.work_root)[1])
    measured = measure(night.partition) if measure else {}
    summary = facts | _counts(night, started) | measured | {"output_uri": night.partition, "files_written": promoted}
    storage.write_bytes(night.summary, json.dumps(summary, indent=2).encode())
    return summary


def _promote(night: Night) -> int:
    """Moves every staged file into the partition; moving again after a crash is harmless (same names)."""
    fs, staging = storage.pyarrow_fs(night.staging)
    _, target = storage.pyarrow_fs(night.partition)
    if fs.get_file_info(staging).type == pafs.FileType.NotFound:
        return 0
    files = _files(fs, staging, recursive=True)
    if not storage.is_s3(night.partition):  # S3 needs no directory, and s3fs lists a directory object as a file
        fs.create_dir(target, recursive=True)
    for f in files:
        fs.move(f.path, f"{target}/{f.base_name}")
    return len(files)


def _counts(night: Night, started: datetime) -> dict:
    """Counts read back from the partition itself; rows scored before `started` came from an earlier run."""
    fs, path = storage.pyarrow_fs(night.partition)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_uri", "flagged", "error", "scored_at"])
    uris = table.column("image_uri").to_pylist()
    new_rows = sum(1 for t in table.column("scored_at").to_pylist() if t >= started)
    seconds = (datetime.now(timezone.utc) - started).total_seconds()
    errors = len(uris) - table.column("error").null_count
    return {
        "rows": len(uris),
        "unique_images": len(set(uris)),
        "scored": len(uris) - errors,
        "errors": errors,
        "flagged": int(pc.sum(table.column("flagged")).as_py() or 0),
        "scored_this_run": new_rows,
        "wall_seconds": round(seconds, 2),
        "images_per_second": round(new_rows / seconds, 2) if seconds > 0 else None,
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }


def _files(fs: pafs.FileSystem, path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    return [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=recursive)) if f.type == pafs.FileType.File]
