"""The nightly scoring job: an archive prefix -> Ray Data -> the CNN -> Parquet, exactly once per image.

  list inputs ─► _inputs/run_date=D/inputs.parquet (minus images already in the partition)
      │  read_parquet (a Read, so Ray Data's checkpoint filter skips rows already written)
      ▼
  prepare: fetch a batch's bytes (concurrent reads), sha256, decode, resize (each bad input becomes an `error`,
           never a crash; Ray fuses this step into the Scorer actors, so pixels never cross processes)
      ▼
  Scorer: model loaded once per actor, predict_on_batch, temperature, alert threshold (actor pool)
      ▼
  write_parquet ─► _staging/run_date=D/   (checkpointed per block in _checkpoints/run_date=D/)
      │  after the whole dataset is written:
      ▼
  promote each file into run_date=D/, then the run summary run_date=D/_summary.json, then drop the checkpoint.

A rerun after a crash scores only what is missing; readers of run_date=D/ never see a half-written file
(a local file appears by rename, an S3 object by a complete PUT), and names starting with `_` are ignored
by pyarrow, DuckDB globs and Hive readers.

Failing instead of hanging (docs/reliability.md): when the storage service itself is down, a run stops with one
clear StorageError instead of recording "cannot read" rows (the object is fine, the service is not), and Ray Data's
own I/O retries are limited to throttling: its nested retry loops (10 attempts with backoff up to 32 s, around
calls that retry 10 times themselves) otherwise keep a run waiting for many minutes on a dead endpoint. Ray Data's
no-progress guard, set to Settings.score_stall_seconds, aborts a run that stands still for any other reason
(a frozen endpoint, resources that never come) with StalledError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import warnings
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
from ray.data import ActorPoolStrategy, DataContext
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX
from ray.data.exceptions import ExecutionTimeoutError

from melanoma import archive, images, metrics, registry, storage
from melanoma.config import IMAGE_SUFFIXES, MELANOMA, Settings, snake_case
from melanoma.errors import MelanomaError

log = logging.getLogger(__name__)

SUMMARY = "_summary.json"
# The only I/O errors Ray Data may retry during a run: throttling, which goes away by itself. A dead or
# unreachable endpoint fails the run within the S3 client's own bounded retries (storage._s3).
RETRIED_IO_ERRORS = ["AWS Error SLOW_DOWN"]


class StalledError(MelanomaError):
    """A run made no progress for Settings.score_stall_seconds and was aborted (one line, for the CLI)."""


RERUN = "(the run stopped; rerun it to resume: rows already written are kept)"


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
        ]
    )


def partition(output_uri: str, run_date: str) -> str:
    return storage.join(output_uri, f"run_date={run_date}")


def _internal(output_uri: str, kind: str, run_date: str) -> str:
    return storage.join(output_uri, f"_{kind}", f"run_date={run_date}")


def prepare(batch: pd.DataFrame, image_size: int, max_pixels: int, max_side: int, fetch_threads: int) -> dict:
    """Ray Data map step: input rows -> sha256, model-sized pixels and a per-row error (None when fine).
    A StorageUnavailable from the fetch (the service is down, not the image) fails the run: a rerun resumes."""
    n = len(batch)
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    digests: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    for i, data in enumerate(archive.fetch_all(batch, fetch_threads)):
        if isinstance(data, storage.StorageError):
            errors[i] = f"cannot read: {data}"
            continue
        digests[i] = hashlib.sha256(data).hexdigest()
        try:
            pixels[i] = images.resize(images.decode(data, max_pixels, max_side), image_size)
        except images.ImageError as exc:
            errors[i] = str(exc)
    return {
        "image_uri": batch["image_uri"].to_numpy(object),
        "image_id": batch["image_id"].to_numpy(object),
        "sha256": np.array(digests, dtype=object),
        "image": pixels,
        "error": np.array(errors, dtype=object),
    }


class Scorer:
    """Ray Data actor: the verified model, loaded once; each batch -> rows of the output schema."""

    def __init__(self, model_uri: str, threads: int):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        self.loaded = registry.load(model_uri)
        card = self.loaded.card
        self.classes = card["class_names"]
        self.schema = output_schema(self.classes)
        self.positive = self.classes.index(card.get("positive_class", MELANOMA))

    def __call__(self, batch: dict) -> pa.Table:
        card = self.loaded.card
        n = len(batch["image_uri"])
        # A column that is all None in a batch can come back from Arrow as floats (NaN): normalise.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        digests = [d if isinstance(d, str) else None for d in batch["sha256"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        probs = np.full((n, len(self.classes)), np.nan)
        if ok.any():
            raw = self.loaded.model.predict_on_batch(batch["image"][ok].astype(np.float32))
            probs[ok] = metrics.temperature_scale(np.asarray(raw, dtype=np.float64), card["temperature"])
        risk = probs[:, self.positive]
        predicted = [self.classes[k] if good else None for k, good in zip(np.nan_to_num(probs).argmax(axis=1), ok)]
        columns = [
            batch["image_id"],
            batch["image_uri"],
            digests,
            pa.array(risk, mask=~ok),
            pa.array(risk >= card["alert_threshold"], mask=~ok),
            predicted,
            *[pa.array(probs[:, k], mask=~ok) for k in range(len(self.classes))],
            [card["version"]] * n,
            [datetime.now(timezone.utc)] * n,
            errors,
        ]
        return pa.Table.from_arrays(
            [pa.array(c, type=f.type) if not isinstance(c, pa.Array) else c for c, f in zip(columns, self.schema)],
            schema=self.schema,
        )


def _already_scored(output_uri: str, run_date: str) -> set[str]:
    fs, path = storage.pyarrow_fs(partition(output_uri, run_date))
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return set()
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_uri"])
    return set(table.column("image_uri").to_pylist())


def _promote(output_uri: str, run_date: str) -> int:
    """Moves every staged file into the partition; moving again after a crash is harmless (same names)."""
    fs, staging = storage.pyarrow_fs(_internal(output_uri, "staging", run_date))
    _, target = storage.pyarrow_fs(partition(output_uri, run_date))
    if fs.get_file_info(staging).type == pafs.FileType.NotFound:
        return 0
    files = [f for f in fs.get_file_info(pafs.FileSelector(staging, recursive=True)) if f.type == pafs.FileType.File]
    fs.create_dir(target, recursive=True)
    for f in files:
        fs.move(f.path, f"{target}/{f.base_name}")
    fs.delete_dir(staging)
    return len(files)


def _summarize(output_uri: str, run_date: str, listed: int, skipped: int, started: datetime, model_version: str) -> dict:
    """Counts read back from the partition itself; rows scored before `started` came from an earlier run."""
    fs, path = storage.pyarrow_fs(partition(output_uri, run_date))
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_uri", "flagged", "error", "scored_at"])
    uris = table.column("image_uri").to_pylist()
    new_rows = sum(1 for t in table.column("scored_at").to_pylist() if t >= started)
    seconds = (datetime.now(timezone.utc) - started).total_seconds()
    errors = len(uris) - table.column("error").null_count
    return {
        "run_date": run_date,
        "model_version": model_version,
        "inputs_listed": listed,
        "other_files_skipped": skipped,
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


def score(s: Settings, model_uri: str, input_uri: str, output_uri: str, run_date: str | None = None) -> dict:
    """Scores every image under input_uri into output_uri/run_date=D/; returns the run summary."""
    started = datetime.now(timezone.utc)
    run_date = run_date or datetime.now(timezone.utc).date().isoformat()
    try:
        date.fromisoformat(run_date)
    except ValueError:
        raise ValueError(f"run date '{run_date}' is not YYYY-MM-DD") from None
    storage.check_writable(output_uri)
    loaded = registry.load(model_uri)  # refuse a bad model before any work
    card = loaded.card
    inputs, skipped = archive.list_inputs(input_uri)
    if inputs.empty:
        raise storage.StorageError(f"{input_uri}: no images ({', '.join(IMAGE_SUFFIXES)}) or tar shards found")
    with _one_line(output_uri):
        todo = inputs[~inputs["image_uri"].isin(_already_scored(output_uri, run_date))]
    log.info("%s: %d images listed, %d to score with model %s", input_uri, len(inputs), len(todo), card["version"])
    if len(todo):
        # the size it was trained at (registry.load checked the card against the model); older cards lack it
        size = card.get("input_size", loaded.model.input_shape[1:])[0] or s.image_size
        _run_pipeline(s, model_uri, size, todo, output_uri, run_date)
    with _one_line(output_uri):
        promoted = _promote(output_uri, run_date)
        storage.delete_dir(_internal(output_uri, "checkpoints", run_date))
        summary = _summarize(output_uri, run_date, len(inputs), skipped, started, card["version"]) | {
            "input_uri": input_uri,
            "model_uri": loaded.uri,
            "output_uri": partition(output_uri, run_date),
            "files_written": promoted,
        }
    storage.write_bytes(storage.join(partition(output_uri, run_date), SUMMARY), json.dumps(summary, indent=2).encode())
    return summary


@contextlib.contextmanager
def _one_line(uri: str):
    """pyarrow's OSError (an S3 call that failed after its retries) as a one-line StorageError naming uri."""
    try:
        yield
    except OSError as exc:
        raise storage.explain(uri, exc) from None


def _run_pipeline(s: Settings, model_uri: str, image_size: int, todo: pd.DataFrame, output_uri: str, run_date: str) -> None:
    inputs_uri = storage.join(_internal(output_uri, "inputs", run_date), "inputs.parquet")
    storage.write_parquet(inputs_uri, todo)
    fs, inputs_path = storage.pyarrow_fs(inputs_uri)
    _, staging = storage.pyarrow_fs(_internal(output_uri, "staging", run_date))
    with _one_line(output_uri):
        _finish_interrupted_commits(_internal(output_uri, "checkpoints", run_date))
    ctx = DataContext.get_current()
    saved = ctx.retried_io_errors, ctx.execution_no_progress_timeout_s, ctx.use_datasource_v2
    # Ray Data's second Parquet reader (the default since 2.60) starts 32 footer-reader actors to read the one small
    # inputs file: 2-3 s of every run's start-up on 2 cores (docs/capacity.md). The first reader reads it in one task,
    # as one block (below), so the same images form the same batches whatever the layout they came from.
    ctx.use_datasource_v2 = False
    ctx.checkpoint_config = CheckpointConfig(
        id_column="image_uri",
        checkpoint_path=_internal(output_uri, "checkpoints", run_date),
        override_filesystem=fs,
        delete_checkpoint_on_success=False,  # dropped by us once the files are promoted
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "substring matching will be deprecated": ours are literal
        ctx.retried_io_errors = RETRIED_IO_ERRORS
    ctx.execution_no_progress_timeout_s = float(s.score_stall_seconds)
    _warn_if_actors_take_every_cpu(s)
    try:
        threads = max(int(s.cpus_per_actor), 1)
        (
            ray.data.read_parquet(inputs_path, filesystem=fs, override_num_blocks=1)
            # Small blocks stream through the actors and reach the writer (and the checkpoint) one by one.
            .repartition(target_num_rows_per_block=4 * s.score_batch_size)
            .map_batches(
                prepare,
                batch_format="pandas",
                batch_size=s.score_batch_size,
                fn_kwargs={
                    "image_size": image_size, "max_pixels": s.max_image_pixels, "max_side": s.max_decoded_side,
                    "fetch_threads": s.fetch_threads,
                },
            )
            .map_batches(
                Scorer,
                fn_constructor_kwargs={"model_uri": model_uri, "threads": threads},
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
            f"{partition(output_uri, run_date)}: nothing moved through the pipeline for {s.score_stall_seconds} s, "
            f"run aborted: check that the S3 endpoint answers and that the cluster has the CPUs/GPUs the run asks "
            f"for {RERUN}"
        ) from None
    except Exception as exc:
        explained = _explain_failure(exc, output_uri)
        if explained is None:
            raise
        raise explained from None
    finally:
        ctx.checkpoint_config = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.retried_io_errors, ctx.execution_no_progress_timeout_s, ctx.use_datasource_v2 = saved


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


def _finish_interrupted_commits(checkpoints_uri: str) -> int:
    """Ray Data commits a written block by moving <id>.pending.parquet to <id>.parquet. On S3 a move is a copy and
    then a delete: a crash between the two (S3 or the worker killed) leaves both files, and Ray Data's recovery then
    deletes the block's data files (pending = unfinished) while the committed file keeps its rows out of the rerun:
    the block is lost. Both files mean the copy was made, which happens only once the data files are written, so the
    commit is finished here, before the rerun's recovery sees it (Ray Data's own commit treats this state the same)."""
    fs, path = storage.pyarrow_fs(checkpoints_uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return 0
    names = {f.base_name for f in fs.get_file_info(pafs.FileSelector(path)) if f.type == pafs.FileType.File}
    pending = f"{PENDING_CHECKPOINT_SUFFIX}.parquet"
    finished = sorted(n for n in names if n.endswith(pending) and f"{n[: -len(pending)]}.parquet" in names)
    for name in finished:
        fs.delete_file(f"{path}/{name}")
    if finished:
        log.warning("%s: finished %d checkpoint commit(s) cut between copy and delete", checkpoints_uri, len(finished))
    return len(finished)


def _explain_failure(exc: BaseException, output_uri: str) -> Exception | None:
    """A one-line StorageError or ModelError for a run that failed on storage or on the model, else None.

    Ray wraps a worker's exception (RayTaskError, Ray Data's UserCodeException) with tracebacks in its text:
    the original is found through .cause / __cause__ / __context__ or, for an exception raised in our own UDF
    (whose chain does not survive pickling), in the traceback text as "melanoma.storage.StorageUnavailable: ..."."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
        if isinstance(e, ray.exceptions.RayError):
            raised = _WORKER_ERROR.search(str(e))
            if raised:
                return _USER_ERRORS[raised.group(1)](f"{raised.group(2).strip()} {RERUN}")
            continue  # its str() is a traceback; look at what it wraps
        if isinstance(e, (storage.StorageError, registry.ModelError)):
            return type(e)(f"{_first_line(e)} {RERUN}")
        if isinstance(e, OSError) and ("AWS Error" in str(e) or "curlCode" in str(e)):
            explained = storage.explain(output_uri, e)
            return type(explained)(f"{explained} {RERUN}")
    return None


_USER_ERRORS = {
    "storage.StorageUnavailable": storage.StorageUnavailable,
    "storage.StorageError": storage.StorageError,
    "registry.ModelError": registry.ModelError,
}
_WORKER_ERROR = re.compile(rf"^melanoma\.({'|'.join(map(re.escape, _USER_ERRORS))}): (.+)$", re.MULTILINE)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def nightly(s: Settings, run_date: str) -> dict:
    """Scores <archive>/<date>/ into <scores>/run_date=<date>/ with the model the settings name."""
    return score(s, s.model_uri, storage.join(s.archive_uri, run_date), s.scores_uri, run_date)
