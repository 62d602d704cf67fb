"""Adding a labelled source to a work dir: validate, deduplicate by content, split by lesion or patient.

A source is a CSV with image_id, label, melanoma, lesion_id, patient_id (and optionally `source`, a sub-source
name kept per row) plus an image folder or prefix holding `<image_id>.jpg`, local or s3://. `label` is one of
the 9 classes or empty: an image known only as "melanoma: no" trains the melanoma output without a class.

Every image whose content (sha256) or id is already in the work dir is dropped, with every other image of its
lesion or patient (they would be near-copies of images already on one side of the split). The rest is split
by group (patient where known, else lesion, else the image itself), stratified by class (melanoma where the
group holds one) and sub-source, seeded: a held-out share first, which is then cut into validation (early stopping,
temperature, alert threshold) and test (never trained or calibrated on). The rows are appended to
manifest.parquet with split = train | val | test; sources.json records what was added.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from tqdm import tqdm

from melanoma import dataset, storage
from melanoma.config import CLASS_NAMES, MELANOMA, settings

log = logging.getLogger(__name__)

SOURCES = "sources.json"
COLUMNS = ["image_id", "label", "melanoma", "lesion_id", "patient_id"]
ROW_COLUMNS = dataset.MANIFEST_COLUMNS + ["split", "source", "melanoma", "group"]


def _text(value) -> str:
    return "" if pd.isna(value) else str(value).strip()


def read_labels(csv_uri: str, images_uri: str, name: str) -> pd.DataFrame:
    """The source's rows (image_id, uri, label, melanoma, group, source), each checked; one line per problem."""
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(csv_uri)), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise dataset.DatasetError(f"{csv_uri}: not a readable CSV ({exc.__class__.__name__})") from None
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise dataset.DatasetError(f"{csv_uri}: missing column {', '.join(missing)} (a source needs {', '.join(COLUMNS)})")
    files = {f.base_name.rsplit(".", 1)[0]: f.path for f in storage.list_files(images_uri, (".jpg", ".jpeg", ".png"))}
    fs, _ = storage.pyarrow_fs(images_uri)
    rows = []
    for i, r in enumerate(table.itertuples(index=False), start=2):
        where = f"{csv_uri} line {i}"
        image_id, label, mel = _text(r.image_id), _text(r.label), _text(r.melanoma)
        if image_id not in files:
            raise dataset.DatasetError(f"{where}: no image file {image_id}.jpg under {images_uri}")
        if label and label not in CLASS_NAMES:
            raise dataset.DatasetError(f"{where}: label '{label}' is not one of the 9 classes ({', '.join(CLASS_NAMES)})")
        if mel not in ("0", "1"):
            raise dataset.DatasetError(f"{where}: melanoma must be 0 or 1, got '{mel}'")
        if (label == MELANOMA) != (mel == "1") and label:
            raise dataset.DatasetError(f"{where}: label '{label}' contradicts melanoma={mel}")
        patient, lesion = _text(r.patient_id), _text(r.lesion_id)
        group = f"patient:{patient}" if patient else f"lesion:{lesion}" if lesion else f"image:{image_id}"
        rows.append({
            "image_id": image_id,
            "uri": storage.to_uri(fs, files[image_id]),
            "label": label or (MELANOMA if mel == "1" else None),
            "melanoma": int(mel),
            "group": f"{name}/{group}",
            "source": _text(getattr(r, "source", "")) or name,
        })
    if not rows:
        raise dataset.DatasetError(f"{csv_uri}: no rows")
    return pd.DataFrame(rows)


def _sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def _pick(groups: pd.Series, fraction: float, rng: np.random.Generator) -> set[str]:
    """About `fraction` of the groups of each stratum (group -> stratum), seeded; a stratum of two or more
    groups gives at least one to each side."""
    picked: set[str] = set()
    for stratum in sorted(groups.unique()):
        members = rng.permutation(np.array(sorted(groups[groups == stratum].index)))
        n = int(round(len(members) * fraction))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        picked.update(members[:n])
    return picked


def split_groups(rows: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """split (train | val | test) per row, by group, stratified by (class, or melanoma where the group holds one; sub-source)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise dataset.DatasetError(f"val and test fractions must be in [0, 1) and sum below 1, got {val_fraction} and {test_fraction}")
    by_group = rows.groupby("group")
    label = by_group["label"].first().fillna("").where(by_group["melanoma"].max() == 0, MELANOMA)
    stratum = label + "|" + by_group["source"].first()
    held_share = val_fraction + test_fraction
    held = _pick(stratum, held_share, np.random.default_rng(seed)) if held_share else set()
    held_strata = stratum[stratum.index.isin(held)]
    val = _pick(held_strata, val_fraction / held_share, np.random.default_rng(seed + 1)) if held and val_fraction else set()
    split = np.where(rows["group"].isin(val), "val", np.where(rows["group"].isin(held), "test", "train"))
    return pd.Series(split, index=rows.index)


def add_source(
    work_uri: str, name: str, read_rows, val_fraction: float, test_fraction: float, seed: int
) -> dict:
    """Appends source `name` (rows from `read_rows()`, as `read_labels` returns them) to work/manifest.parquet;
    a source already added is skipped without reading it. Returns its report."""
    added = read_sources(work_uri)
    if name in added:
        log.info("source %s already in %s: skipped", name, work_uri)
        return added[name] | {"skipped": True}
    manifest = dataset.read_manifest(work_uri)
    rows = read_rows()
    with ThreadPoolExecutor(settings().hash_threads) as pool:
        rows["sha256"] = list(tqdm(pool.map(_sha256, rows["uri"]), total=len(rows), desc=f"hash {name}", unit="img"))
    copies = rows["sha256"].duplicated()
    rows = rows[~copies]
    touching = rows["image_id"].isin(set(manifest["image_id"])) | rows["sha256"].isin(set(manifest["sha256"]))
    dropped_groups = set(rows.loc[touching, "group"])
    kept = rows[~rows["group"].isin(dropped_groups)].reset_index(drop=True)
    kept["split"] = split_groups(kept, val_fraction, test_fraction, seed)
    combined = pd.concat([with_source_columns(manifest), kept[ROW_COLUMNS]], ignore_index=True)
    report = {
        "rows": int(len(rows) + copies.sum()),
        "duplicate_contents_dropped": int(copies.sum()),
        "groups_touching_work_dir_dropped": len(dropped_groups),
        "images_dropped_with_them": int(rows["group"].isin(dropped_groups).sum()),
        "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
        "per_split": {s: {k: int(v) for k, v in g["source"].value_counts().sort_index().items()} for s, g in kept.groupby("split")},
        "melanomas_per_split": {s: int(g["melanoma"].sum()) for s, g in kept.groupby("split")},
    }
    storage.write_parquet(storage.join(work_uri, dataset.MANIFEST), combined)
    storage.write_bytes(storage.join(work_uri, SOURCES), json.dumps(added | {name: report}, indent=2).encode())
    return report


def with_source_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """A manifest with source, melanoma and group set (a class-folder manifest has only image_id, uri, label, sha256, split)."""
    out = manifest.copy()
    if "source" not in out:
        out["source"] = "isic-9class"
    if "melanoma" not in out:
        out["melanoma"] = (out["label"] == MELANOMA).astype(int)
    if "group" not in out:
        out["group"] = "isic-9class/image:" + out["image_id"]
    return out[ROW_COLUMNS]


def read_sources(work_uri: str) -> dict:
    uri = storage.join(work_uri, SOURCES)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
