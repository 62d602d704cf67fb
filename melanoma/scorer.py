"""One batch of the scoring job, the same in a Ray Data actor or in a plain loop (benchmarks/score_throughput.py):

  prepare  input rows -> each image's bytes (reads from object storage overlap), sha256, decoded and resized
           pixels, drift statistics; a bad input becomes an `error`, never a crash
  Scorer   pixels -> rows of the output schema: the engine (engine.py), temperature, alert threshold

Nothing here imports Ray: a plain loop pays only for what it uses.
"""

from __future__ import annotations

import functools
import hashlib
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa

from melanoma import archive, drift, engine, images, layout, metrics, runtime, storage
from melanoma.config import MELANOMA


def prepare(batch: pd.DataFrame, image_size: int, max_pixels: int, max_side: int, fetch_threads: int) -> dict:
    """Ray Data map step: input rows -> sha256, model-sized pixels, their drift statistics and a per-row error (None
    when fine; the statistics of a row with an error mean nothing).
    A StorageUnavailable from the fetch (the service is down, not the image) fails the run: a rerun resumes."""
    n = len(batch)
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    digests: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    widths, heights = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    for i, data in enumerate(archive.fetch_all(batch, fetch_threads)):
        if isinstance(data, storage.StorageError):
            errors[i] = f"cannot read: {data}"
            continue
        digests[i] = hashlib.sha256(data).hexdigest()
        try:
            decoded = images.decode(data, max_pixels, max_side)
            pixels[i] = images.resize(decoded, image_size)
            heights[i], widths[i] = decoded.shape[:2]
        except images.ImageError as exc:
            errors[i] = str(exc)
    return {
        "image_uri": batch["image_uri"].to_numpy(object),
        "image_id": batch["image_id"].to_numpy(object),
        "sha256": np.array(digests, dtype=object),
        "image": pixels,
        "error": np.array(errors, dtype=object),
        **drift.image_stats(pixels, widths, heights),
    }


class Scorer:
    """Ray Data actor: each batch -> rows of the output schema. The verified model is loaded once, on the actor's
    first batch, through the engine the settings name (melanoma/engine.py): an error loading it then reaches the
    driver as itself (from a constructor, only as text)."""

    def __init__(self, model_uri: str, engine_name: str, threads: int, gpu: bool, progress: runtime.Feed):
        self.model_uri, self.engine_name, self.threads, self.gpu = model_uri, engine_name, threads, gpu
        self.progress = progress  # the driver's bar: Ray Data has no driver-side callback per batch

    @functools.cached_property
    def loaded(self):
        return engine.load(self.model_uri, self.engine_name, self.threads, self.gpu)

    def __call__(self, batch: dict) -> pa.Table:
        predictor, card, _ = self.loaded
        classes = card["class_names"]
        schema = layout.output_schema(classes)
        n = len(batch["image_uri"])
        # A column that is all None in a batch can come back from Arrow as floats (NaN): normalise.
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        digests = [d if isinstance(d, str) else None for d in batch["sha256"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        probs = np.full((n, len(classes)), np.nan)
        if ok.any():
            probs[ok] = metrics.temperature_scale(predictor.predict(batch["image"][ok]), card["temperature"])
        risk = probs[:, classes.index(card.get("positive_class", MELANOMA))]
        predicted = [classes[k] if good else None for k, good in zip(np.nan_to_num(probs).argmax(axis=1), ok)]
        columns = [
            batch["image_id"],
            batch["image_uri"],
            digests,
            pa.array(risk, mask=~ok),
            pa.array(risk >= card["alert_threshold"], mask=~ok),
            predicted,
            *[pa.array(probs[:, k], mask=~ok) for k in range(len(classes))],
            [card["version"]] * n,
            [datetime.now(timezone.utc)] * n,
            errors,
            *_stat_columns(batch, ok),
        ]
        self.progress.add(n)
        return pa.Table.from_arrays(
            [pa.array(c, type=f.type) if not isinstance(c, pa.Array) else c for c, f in zip(columns, schema)],
            schema=schema,
        )


def _stat_columns(batch: dict, ok: np.ndarray) -> list[pa.Array]:
    """The drift statistics prepare measured, null where the image could not be scored."""
    return [pa.array(np.asarray(batch[name], dtype=kind.to_pandas_dtype()), mask=~ok) for name, kind in layout.IMAGE_STATS.items()]
