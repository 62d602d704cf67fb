"""The nightly scoring job: an archive prefix -> Ray Data -> the CNN -> Parquet, exactly once per image.

  list inputs ─► <work>/run_date=D/inputs.parquet (minus images already in the partition)
      │  read_parquet (a Read, so Ray Data's checkpoint filter skips rows already written)
      ▼
  scorer.prepare: fetch a batch's bytes, sha256, decode, resize, drift statistics (a bad input becomes an `error`,
                  never a crash; Ray fuses this step into the Scorer actors, so pixels never cross processes)
      ▼
  scorer.Scorer: model loaded once per actor (TF-Lite on CPU, engine.py), temperature, alert threshold (actor pool)
      ▼
  write_parquet ─► <work>/run_date=D/staging/   (checkpointed per block in <work>/run_date=D/checkpoints/)
      │  after the whole dataset is written (commit.py):
      ▼
  <scores>/run_date=D/*.parquet, then <scores>/run_date=D/_summary.json (with the night's drift against the model's
  validation set, drift.py); the night's <work> is dropped.

<work> (layout.py) lies outside the scores dataset: `<scores>/**/*.parquet` matches the rows and nothing else.

Failing instead of hanging (docs/reliability.md): when the storage service itself is down, a run stops with one
clear StorageError instead of recording "cannot read" rows (the object is fine, the service is not), and Ray Data's
own I/O retries are limited to throttling: its nested retry loops (10 attempts with backoff up to 32 s, around
calls that retry 10 times themselves) otherwise keep a run waiting for many minutes on a dead endpoint. Ray Data's
no-progress guard, set to Settings.score_stall_seconds, aborts a run that stands still for any other reason
(a frozen endpoint, resources that never come) with StalledError.
"""

from __future__ import annotations

import functools
import logging
from datetime import date, datetime, timezone

import pyarrow.dataset as pads
import ray
from ray.data import ActorPoolStrategy
from ray.data.exceptions import ExecutionTimeoutError

from melanoma import archive, commit, drift, engine, layout, ray_adapter, runtime, scorer, storage
from melanoma.config import IMAGE_SUFFIXES, Settings
from melanoma.errors import MelanomaError

log = logging.getLogger(__name__)

# The only I/O errors Ray Data may retry during a run: throttling, which goes away by itself. A dead or
# unreachable endpoint fails the run within the S3 client's own bounded retries (storage._s3).
RETRIED_IO_ERRORS = ["AWS Error SLOW_DOWN"]
RERUN = "(the run stopped; rerun it to resume: rows already written are kept)"


class StalledError(MelanomaError):
    """A run made no progress for Settings.score_stall_seconds and was aborted."""


def score(s: Settings, model_uri: str, input_uri: str, output_uri: str, run_date: str | None = None) -> dict:
    """Scores every image under input_uri into output_uri/run_date=D/; returns the run summary."""
    started = datetime.now(timezone.utc)
    run_date = run_date or started.date().isoformat()
    try:
        date.fromisoformat(run_date)
    except ValueError:
        raise ValueError(f"run date '{run_date}' is not YYYY-MM-DD") from None
    night = layout.night(output_uri, run_date, s.work_uri)
    storage.check_writable(output_uri)
    # refuse a bad model before any work
    version_dir, card, engine_name = engine.check(model_uri, s.engine, s.gpus_per_actor > 0)
    reference = drift.read_reference(version_dir, card)
    if reference is None:
        log.warning("%s was published without a drift reference: the night is not compared with its validation set", version_dir)
    inputs, skipped = archive.list_inputs(input_uri)
    if inputs.empty:
        raise storage.StorageError(f"{input_uri}: no images ({', '.join(IMAGE_SUFFIXES)}) or tar shards found")
    commit.adopt_legacy(night)
    todo = inputs[~inputs["image_uri"].isin(commit.already_scored(night))]
    log.info("%s: %d images listed, %d to score with model %s", input_uri, len(inputs), len(todo), card["version"])
    if len(todo):
        commit.start(night, todo)
        size = card.get("input_size", [s.image_size])[0]  # the size it was trained at; older cards lack it
        with runtime.remote_progress(len(todo), "score", "img") as progress:
            _run_pipeline(s, version_dir, size, night, progress)  # the version checked, even if `latest` moves
    facts = {
        "run_date": run_date, "model_version": card["version"], "inputs_listed": len(inputs),
        "other_files_skipped": skipped, "input_uri": input_uri, "model_uri": version_dir, "engine": engine_name,
    }  # fmt: skip
    return commit.finish(night, facts, started, functools.partial(_night_drift, reference=reference, card=card, s=s))


def _night_drift(partition: str, reference: dict | None, card: dict, s: Settings) -> dict:
    """The drift of every scored row of the complete night (rows of an earlier run included)."""
    fs, path = storage.pyarrow_fs(partition)
    schema = layout.output_schema(card["class_names"])  # rows written before the statistics existed read as null
    columns = [*drift.STAT_COLUMNS, "melanoma_risk", "flagged", "predicted_class"]
    rows = pads.dataset(path, filesystem=fs, format="parquet", schema=schema).to_table(columns=columns).to_pandas()
    return {"drift": drift.night_drift(rows, reference, card["version"], s.drift_psi, s.drift_p_value)}


def nightly(s: Settings, run_date: str) -> dict:
    """Scores <archive>/<date>/ into <scores>/run_date=<date>/ with the model the settings name."""
    return score(s, s.model_uri, storage.join(s.archive_uri, run_date), s.scores_uri, run_date)


def _run_pipeline(s: Settings, model_uri: str, image_size: int, night: layout.Night, progress: runtime.Feed) -> None:
    fs, inputs_path = storage.pyarrow_fs(night.inputs)
    _, staging = storage.pyarrow_fs(night.staging)
    _warn_if_actors_take_every_cpu(s)
    try:
        with ray_adapter.run_context("image_uri", night.checkpoints, fs, s.score_stall_seconds, RETRIED_IO_ERRORS):
            # The first Parquet reader reads the inputs file in one task, as one block, so the same images form the
            # same batches whatever the layout they came from. Small blocks then stream through the actors and
            # reach the writer (and the checkpoint) one by one.
            (
                ray.data.read_parquet(inputs_path, filesystem=fs, override_num_blocks=1)
                .repartition(target_num_rows_per_block=4 * s.score_batch_size)
                .map_batches(
                    scorer.prepare,
                    batch_format="pandas",
                    batch_size=s.score_batch_size,
                    fn_kwargs={
                        "image_size": image_size, "max_pixels": s.max_image_pixels, "max_side": s.max_decoded_side,
                        "fetch_threads": s.fetch_threads,
                    },
                )
                .map_batches(
                    scorer.Scorer,
                    fn_constructor_kwargs={
                        "model_uri": model_uri, "engine_name": s.engine, "threads": max(int(s.cpus_per_actor), 1),
                        "gpu": s.gpus_per_actor > 0, "progress": progress,
                    },
                    compute=ActorPoolStrategy(size=s.actors),
                    num_cpus=s.cpus_per_actor,
                    num_gpus=s.gpus_per_actor,
                    batch_size=s.score_batch_size,
                    batch_format="numpy",
                )
                .write_parquet(staging, filesystem=fs, max_rows_per_file=s.rows_per_file)
            )
    except ExecutionTimeoutError as exc:
        log.warning("Ray Data's no-progress guard stopped the run: %s", exc)  # names the operators still running
        raise StalledError(
            f"{night.partition}: nothing moved through the pipeline for {s.score_stall_seconds} s, run aborted: "
            f"check that the S3 endpoint answers and that the cluster has the CPUs/GPUs the run asks for {RERUN}"
        ) from None
    except Exception as exc:
        explained = ray_adapter.user_error(exc, night.scores_uri)
        if explained is None:
            raise
        raise type(explained)(f"{explained} {RERUN}") from None


def _warn_if_actors_take_every_cpu(s: Settings) -> None:
    """Ray Data's read and write tasks need a CPU of their own: an actor pool that holds every CPU of the cluster
    never gets input (measured: the run stands still). An autoscaler may still add nodes, so this only warns."""
    if not ray.is_initialized():
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    if s.actors * s.cpus_per_actor >= cpus:
        log.warning(
            "%d actors x %g CPUs take all %g CPUs of the cluster and leave none for reading inputs: the run waits for "
            "the autoscaler to add a node, or stops after %d s; use --actors %d here",
            s.actors, s.cpus_per_actor, cpus, s.score_stall_seconds, max(int((cpus - 1) // max(s.cpus_per_actor, 1e-9)), 1),
        )
