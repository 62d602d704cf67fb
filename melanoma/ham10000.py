"""HAM10000 as optional extra training data for the 9-class model, split by lesion.

HAM10000 (`<root>/HAM10000_metadata.csv` with lesion_id, image_id, dx and `<root>/images/<image_id>.jpg`)
has 7 diagnoses, each of which is one of our 9 classes. Many of its images are already in the 9-class
ISIC set, and a lesion often has several images, so:

- every HAM lesion that has any image in the 9-class set (by ISIC id or by identical content) is dropped
  whole: its other images would otherwise be near-copies of 9-class validation (or training) images;
- the remaining lesions are split train/val by lesion_id, stratified by diagnosis and seeded, so no lesion
  straddles the two;
- `build_work` writes a work directory whose manifest is the 9-class manifest plus the HAM training rows
  (split = "train"), so `melanoma train --data <it>` trains on both and still validates on the 9-class
  validation split only; the HAM validation rows go to ham_val.parquet, a second held-out set.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import numpy as np
import pandas as pd

from melanoma import augment, dataset, storage

log = logging.getLogger(__name__)

METADATA = "HAM10000_metadata.csv"
IMAGES_DIR = "images"
HAM_VAL = "ham_val.parquet"
HAM_TO_CLASS = {
    "akiec": "actinic keratosis",
    "bcc": "basal cell carcinoma",
    "bkl": "pigmented benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "nevus",
    "vasc": "vascular lesion",
}
COLUMNS = ["image_id", "uri", "label", "sha256", "lesion_id", "split"]


def read_metadata(ham_root: str) -> pd.DataFrame:
    """image_id, lesion_id, dx, label (our class name), uri of the image."""
    uri = storage.join(ham_root, METADATA)
    meta = pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
    missing = {"lesion_id", "image_id", "dx"} - set(meta.columns)
    if missing:
        raise dataset.DatasetError(f"{uri}: missing columns {', '.join(sorted(missing))}")
    unknown = sorted(set(meta["dx"]) - set(HAM_TO_CLASS))
    if unknown:
        raise dataset.DatasetError(f"{uri}: unknown dx '{unknown[0]}' (expected one of {', '.join(HAM_TO_CLASS)})")
    meta = meta[["image_id", "lesion_id", "dx"]].copy()
    meta["label"] = meta["dx"].map(HAM_TO_CLASS)
    meta["uri"] = [storage.join(ham_root, IMAGES_DIR, f"{i}.jpg") for i in meta["image_id"]]
    return meta.sort_values("image_id", ignore_index=True)


def _sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def _pick_lesions(rows: pd.DataFrame, fraction: float, rng: np.random.Generator) -> tuple[set[str], list[str]]:
    """(about `fraction` of the lesions of each label, the other lesions in seeded order). A label with two or
    more lesions gives at least one to each side."""
    lesions = rows.groupby("lesion_id")["label"].first()
    picked: set[str] = set()
    others: list[str] = []
    for label in sorted(lesions.unique()):
        members = rng.permutation(np.array(sorted(lesions[lesions == label].index)))
        n = int(round(len(members) * fraction))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        picked.update(members[:n])
        others += list(members[n:])
    return picked, others


def lesion_split(
    meta: pd.DataFrame,
    exclude: pd.DataFrame,
    val_fraction: float,
    seed: int,
    max_train_per_class: int | dict[str, int] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """HAM rows (COLUMNS) not touching `exclude` (a manifest: image_id, sha256), split by lesion.

    `meta` needs image_id, lesion_id, label, uri and sha256. `max_train_per_class` (a number for every class,
    or {class: number} for some) keeps at most that many training images of a class, whole lesions at a time
    in seeded order (to bound epoch time; validation is never subsampled). Returns (rows, report)."""
    if not 0 < val_fraction < 1:
        raise dataset.DatasetError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    touching = meta["image_id"].isin(set(exclude["image_id"])) | meta["sha256"].isin(set(exclude["sha256"]))
    dropped_lesions = set(meta.loc[touching, "lesion_id"])
    keep = meta[~meta["lesion_id"].isin(dropped_lesions)].drop_duplicates("sha256")
    val_lesions, train_order = _pick_lesions(keep, val_fraction, np.random.default_rng(seed))
    rows = keep.copy()
    rows["split"] = np.where(rows["lesion_id"].isin(val_lesions), "val", "train")
    subsampled = 0
    if max_train_per_class is not None:
        rank = {lesion: i for i, lesion in enumerate(train_order)}
        train = rows[rows["split"] == "train"].assign(_rank=lambda d: d["lesion_id"].map(rank))
        train = train.sort_values(["_rank", "image_id"])
        caps = max_train_per_class if isinstance(max_train_per_class, dict) else None
        cap = (lambda label: caps.get(label, len(train))) if caps is not None else (lambda label: max_train_per_class)
        kept = pd.concat([g.head(cap(label)) for label, g in train.groupby("label")])
        subsampled = len(train) - len(kept)
        rows = pd.concat([kept.drop(columns="_rank"), rows[rows["split"] == "val"]])
    rows = rows[COLUMNS].sort_values(["split", "image_id"], ignore_index=True)
    report = {
        "ham_images": int(len(meta)),
        "ham_lesions": int(meta["lesion_id"].nunique()),
        "dropped_lesions_touching_9class": len(dropped_lesions),
        "dropped_images_touching_9class": int(meta["lesion_id"].isin(dropped_lesions).sum()),
        "train_images_subsampled_away": int(subsampled),
        "per_split": {
            split: {k: int(v) for k, v in g["label"].value_counts().sort_index().items()}
            for split, g in rows.groupby("split")
        },
        "val_fraction": val_fraction,
        "split_seed": seed,
    }
    return rows, report


def build_work(
    work_uri: str,
    ham_root: str,
    out_uri: str,
    val_fraction: float = 0.2,
    seed: int = 42,
    max_train_per_class: int | dict[str, int] | None = None,
    with_augmented: bool = False,
    val_to_manifest: float = 0.0,
) -> dict:
    """out/manifest.parquet = the 9-class manifest + HAM training rows; out/ham_val.parquet = HAM validation
    rows; out/ham_audit.json. With `with_augmented`, the 9-class Augmentor records are copied too.

    `val_to_manifest` > 0 moves that fraction of the HAM validation lesions (stratified, seeded) into the
    manifest's validation split, so early stopping, the temperature and the alert threshold are fitted on
    both sources, not on a split in which the image source predicts the class (docs/quality.md); the other
    HAM validation lesions stay in ham_val.parquet, untouched by training, as the test set."""
    if not 0 <= val_to_manifest < 1:
        raise dataset.DatasetError(f"val_to_manifest must be in [0, 1), got {val_to_manifest}")
    storage.check_writable(out_uri)
    manifest = dataset.read_manifest(work_uri)
    meta = read_metadata(ham_root)
    meta["sha256"] = [_sha256(u) for u in meta["uri"]]
    rows, report = lesion_split(meta, manifest, val_fraction, seed, max_train_per_class)
    val = rows[rows["split"] == "val"]
    moved = _pick_lesions(val, val_to_manifest, np.random.default_rng(seed + 1))[0] if val_to_manifest else set()
    in_manifest = rows[(rows["split"] == "train") | rows["lesion_id"].isin(moved)]
    rows = rows[~rows["lesion_id"].isin(moved)]
    report["val_to_manifest"] = {
        "fraction": val_to_manifest,
        "lesions": len(moved),
        "per_class": {k: int(v) for k, v in in_manifest.loc[in_manifest["split"] == "val", "label"].value_counts().sort_index().items()},
    }
    combined = pd.concat([manifest, in_manifest[dataset.MANIFEST_COLUMNS + ["split"]]], ignore_index=True)
    audit_uri = storage.join(work_uri, "audit.json")
    if storage.exists(audit_uri):
        storage.write_bytes(storage.join(out_uri, "audit.json"), storage.read_bytes(audit_uri))
    if with_augmented and augment.read_augmented(work_uri) is not None:
        storage.write_parquet(
            storage.join(out_uri, augment.AUGMENTED_DIR, augment.RECORDS), augment.read_augmented(work_uri)
        )
    report |= {"work_uri": work_uri, "ham_root": ham_root, "with_augmented": with_augmented}
    storage.write_bytes(storage.join(out_uri, "ham_audit.json"), json.dumps(report, indent=2).encode())
    storage.write_parquet(storage.join(out_uri, HAM_VAL), rows[rows["split"] == "val"].reset_index(drop=True))
    storage.write_parquet(storage.join(out_uri, dataset.MANIFEST), combined)
    log.info("HAM10000: %s", report["per_split"])
    return report


def read_val(uri: str) -> pd.DataFrame:
    """HAM validation rows with label_index, ready for train.evaluate."""
    from melanoma.config import CLASS_NAMES

    rows = storage.read_parquet(storage.join(uri, HAM_VAL))
    rows["label_index"] = rows["label"].map(CLASS_NAMES.index)
    return rows
