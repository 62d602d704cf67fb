"""The nightly scoring job: an archive prefix -> Ray Data -> the CNN -> Parquet, exactly once per image.

  list inputs ─► _inputs/run_date=D/inputs.parquet (minus images already in the partition)
      │  read_parquet (a Read, so Ray Data's checkpoint filter skips rows already written)
      ▼
  prepare: fetch bytes, sha256, decode, resize (tasks; each bad input becomes an `error`, never a crash)
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
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from melanoma import archive, images, metrics, registry, storage
from melanoma.config import IMAGE_SUFFIXES, MELANOMA, Settings, snake_case

log = logging.getLogger(__name__)

SUMMARY = "_summary.json"


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


def prepare(batch: pd.DataFrame, image_size: int, max_pixels: int, max_side: int) -> dict:
    """Ray Data map step: input rows -> sha256, model-sized pixels and a per-row error (None when fine)."""
    n = len(batch)
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    digests: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    for i, row in enumerate(batch.itertuples(index=False)):
        try:
            data = archive.fetch(row.image_uri, row.shard_uri, row.offset, row.size)
            digests[i] = hashlib.sha256(data).hexdigest()
            pixels[i] = images.resize(images.decode(data, max_pixels, max_side), image_size)
        except storage.StorageError as exc:
            errors[i] = f"cannot read: {exc}"
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
    todo = inputs[~inputs["image_uri"].isin(_already_scored(output_uri, run_date))]
    log.info("%s: %d images listed, %d to score with model %s", input_uri, len(inputs), len(todo), card["version"])
    if len(todo):
        _run_pipeline(s, model_uri, todo, output_uri, run_date)
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


def _run_pipeline(s: Settings, model_uri: str, todo: pd.DataFrame, output_uri: str, run_date: str) -> None:
    inputs_uri = storage.join(_internal(output_uri, "inputs", run_date), "inputs.parquet")
    storage.write_parquet(inputs_uri, todo)
    fs, inputs_path = storage.pyarrow_fs(inputs_uri)
    _, staging = storage.pyarrow_fs(_internal(output_uri, "staging", run_date))
    ctx = DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(
        id_column="image_uri",
        checkpoint_path=_internal(output_uri, "checkpoints", run_date),
        override_filesystem=fs,
        delete_checkpoint_on_success=False,  # dropped by us once the files are promoted
    )
    try:
        threads = max(int(s.cpus_per_actor), 1)
        (
            ray.data.read_parquet(inputs_path, filesystem=fs)
            # Small blocks stream through the actors and reach the writer (and the checkpoint) one by one.
            .repartition(target_num_rows_per_block=4 * s.score_batch_size)
            .map_batches(
                prepare,
                batch_format="pandas",
                batch_size=s.score_batch_size,
                fn_kwargs={"image_size": s.image_size, "max_pixels": s.max_image_pixels, "max_side": s.max_decoded_side},
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
    finally:
        ctx.checkpoint_config = None


def nightly(s: Settings, run_date: str) -> dict:
    """Scores <archive>/<date>/ into <scores>/run_date=<date>/ with the model the settings name."""
    return score(s, s.model_uri, storage.join(s.archive_uri, run_date), s.scores_uri, run_date)
