"""Augmentor rebalancing of the training split: new samples per class until every class reaches a target.

Only rows with split == "train" are used as sources, so no augmented copy of a validation image can
exist. Each sample is drawn and transformed with a seed derived from (seed, class, index), so two runs
write the same files whatever the thread timing; its record names the source image it came from.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from concurrent.futures import ThreadPoolExecutor

import Augmentor
import numpy as np
import pandas as pd
from PIL import Image

from melanoma import dataset, storage
from melanoma.console import progress

log = logging.getLogger(__name__)

AUGMENTED_DIR = "augmented"
RECORDS = "augmented.parquet"


def pipeline() -> Augmentor.Pipeline:
    """The seed notebook's operations; BICUBIC since Pillow 13 removed ANTIALIAS."""
    p = Augmentor.Pipeline()
    p.rotate(probability=0.7, max_left_rotation=10, max_right_rotation=10)
    p.flip_left_right(probability=0.5)
    p.flip_top_bottom(probability=0.5)
    p.zoom_random(probability=0.5, percentage_area=0.85)
    for op in p.operations:
        if hasattr(op, "resample_filter"):
            op.resample_filter = "BICUBIC"
    return p


def plan(train: pd.DataFrame, target: int | None = None, add: int | None = None) -> dict[str, int]:
    """How many samples to add per class: up to `target` images per class (default: the largest class), or `add` each."""
    counts = train["label"].value_counts()
    if add is not None:
        return {label: add for label in sorted(counts.index)}
    goal = target if target is not None else int(counts.max())
    return {label: max(goal - int(n), 0) for label, n in sorted(counts.items())}


def _sample_seed(seed: int, label: str, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{label}/{index}".encode()).digest()[:8], "big")


def _make_sample(transform, sources: pd.DataFrame, images: dict, label: str, index: int, seed: int) -> tuple[dict, bytes]:
    """One seeded draw of a source image and of Augmentor's operations, JPEG-encoded."""
    rng_seed = _sample_seed(seed, label, index)
    random.seed(rng_seed)
    np.random.seed(rng_seed % 2**32)
    source = sources.iloc[random.randrange(len(sources))]
    buf = io.BytesIO()
    transform(images[source["image_id"]].copy()).convert("RGB").save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    record = {
        "image_id": f"{source['image_id']}_aug_{label.replace(' ', '_')}_{index:05d}",
        "label": label,
        "sha256": hashlib.sha256(data).hexdigest(),
        "source_image_id": source["image_id"],
        "source_sha256": source["sha256"],
    }
    return record, data


def augment(manifest: pd.DataFrame, out: str, seed: int, target: int | None = None, add: int | None = None) -> pd.DataFrame:
    """Writes the samples under out/<class>/ and their records to out/augmented.parquet (last, so it marks completion)."""
    train = manifest[manifest["split"] == "train"]
    to_add = plan(train, target, add)
    transform = pipeline().torch_transform()
    records = []
    jobs = []
    for label, n in to_add.items():
        sources = train[train["label"] == label].sort_values("image_id", ignore_index=True)
        images = {r.image_id: Image.open(io.BytesIO(storage.read_bytes(r.uri))).convert("RGB") for r in sources.itertuples()}
        jobs += [(sources, images, label, i) for i in range(n)]
    log.info("augmenting %d samples: %s", len(jobs), to_add)
    # Transforms run one at a time (Augmentor draws from the global `random`); only the writes overlap.
    with ThreadPoolExecutor(8) as pool:
        writes = []
        for sources, images, label, i in progress(jobs, desc="augment", unit="img"):
            record, data = _make_sample(transform, sources, images, label, i, seed)
            record["uri"] = storage.join(out, label, f"{record['image_id']}.jpg")
            writes.append(pool.submit(storage.write_bytes, record["uri"], data))
            records.append(record)
        for w in writes:
            w.result()
    frame = pd.DataFrame(records, columns=["image_id", "uri", "label", "sha256", "source_image_id", "source_sha256"])
    storage.write_parquet(storage.join(out, RECORDS), frame)
    return frame


def augment_work_dir(work_uri: str, seed: int, target: int | None = None, add: int | None = None) -> pd.DataFrame:
    """Augments the training split of work/manifest.parquet into work/augmented/."""
    manifest = dataset.read_manifest(work_uri)
    return augment(manifest, storage.join(work_uri, AUGMENTED_DIR), seed, target, add)


def read_augmented(work_uri: str) -> pd.DataFrame | None:
    uri = storage.join(work_uri, AUGMENTED_DIR, RECORDS)
    return storage.read_parquet(uri) if storage.exists(uri) else None
