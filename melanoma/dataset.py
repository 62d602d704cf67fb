"""Class-folder datasets: scan and hash, audit, the training manifest and its leak-free split.

A dataset is `<root>/<class name>/<image file>`. The manifest has one row per unique image content
(sha256). Conflicting labels (the same content in two class folders) are dropped, or resolved from a
ground-truth CSV when one is given and it names exactly one of the folders. The split is by image id, or
by lesion for the images a lesion map knows (several photos of one lesion must not straddle train and
validation), stratified by label, seeded, and made before any augmentation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image

from melanoma import storage
from melanoma.config import CLASS_NAMES, GROUND_TRUTH_CODES, IMAGE_SUFFIXES, settings
from melanoma.console import progress
from melanoma.errors import MelanomaError

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = ["image_id", "uri", "label", "sha256"]


class DatasetError(MelanomaError):
    """A one-line, user-facing problem with a dataset (which file or folder, what was wrong)."""


def image_id(file_name: str) -> str:
    """'ISIC_0025509(1).jpg' -> 'ISIC_0025509': copies made by a download tool keep the id of the original."""
    stem = file_name.rsplit(".", 1)[0]
    return re.sub(r"\s*\(\d+\)$", "", stem)


def _hash_image(uri: str) -> tuple[str, int]:
    data = storage.read_bytes(uri)
    try:
        Image.open(io.BytesIO(data)).verify()
    except Exception:
        raise DatasetError(f"{uri}: not a readable image") from None
    return hashlib.sha256(data).hexdigest(), len(data)


def scan(root: str) -> pd.DataFrame:
    """One row per file: uri, label (class folder), image_id, sha256, bytes."""
    files = storage.list_files(root)
    if not files:
        raise DatasetError(f"{root}: no files (expected <root>/<class name>/<image file>)")
    fs, base = storage.pyarrow_fs(root)
    rows = []
    for f in files:
        parts = f.path[len(base) :].strip("/").split("/")
        if len(parts) != 2:
            raise DatasetError(f"{storage.to_uri(fs, f.path)}: not in a class folder (expected <root>/<class>/<file>)")
        if not parts[1].lower().endswith(IMAGE_SUFFIXES):
            raise DatasetError(f"{storage.to_uri(fs, f.path)}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
        rows.append({"uri": storage.to_uri(fs, f.path), "label": parts[0], "image_id": image_id(parts[1])})
    unknown = sorted({r["label"] for r in rows} - set(CLASS_NAMES))
    if unknown:
        raise DatasetError(f"{root}: unknown class folder '{unknown[0]}' (expected one of {', '.join(CLASS_NAMES)})")
    with ThreadPoolExecutor(settings().hash_threads) as pool:
        hashed = list(progress(pool.map(_hash_image, [r["uri"] for r in rows]), total=len(rows), desc="hash", unit="img"))
    df = pd.DataFrame(rows)
    df["sha256"] = [h for h, _ in hashed]
    df["bytes"] = [n for _, n in hashed]
    return df


def read_ground_truth(uri: str) -> pd.Series:
    """ISIC 2019 ground truth as a Series image id -> code (MEL, NV, ...). Accepts the one-hot layout too."""
    try:
        gt = pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{uri}: not a CSV file ({str(exc).splitlines()[0]})") from None
    if "image" not in gt.columns:
        raise DatasetError(f"{uri}: ground truth needs an 'image' column, found {list(gt.columns)[:5]}")
    if "label" not in gt.columns:
        codes = [c for c in GROUND_TRUTH_CODES if c in gt.columns]
        if not codes:
            raise DatasetError(f"{uri}: ground truth needs a 'label' column or one-hot columns MEL, NV, ...")
        gt["label"] = gt[codes].idxmax(axis=1)
    bad = sorted(set(gt["label"]) - set(GROUND_TRUTH_CODES))
    if bad:
        raise DatasetError(f"{uri}: unknown label '{bad[0]}' (expected one of {', '.join(GROUND_TRUTH_CODES)})")
    return gt.set_index("image")["label"]


def audit(files: pd.DataFrame, ground_truth: pd.Series | None = None) -> dict:
    """Counts of files, unique contents, duplicate groups and groups whose copies disagree on the label."""
    groups = files.groupby("sha256")
    sizes = groups.size()
    labels = groups["label"].nunique()
    conflicts = files[files["sha256"].isin(labels[labels > 1].index)]
    report = {
        "files": int(len(files)),
        "unique_images": int(len(sizes)),
        "duplicate_groups": int((sizes > 1).sum()),
        "duplicate_files": int(sizes[sizes > 1].sum() - (sizes > 1).sum()),
        "conflicting_groups": int((labels > 1).sum()),
        "files_per_class": {k: int(v) for k, v in files["label"].value_counts().sort_index().items()},
        "conflicts": [
            {"sha256": sha, "files": sorted(g["uri"]), "labels": sorted(set(g["label"]))}
            for sha, g in conflicts.groupby("sha256")
        ],
    }
    if ground_truth is not None:
        known = files[files["image_id"].isin(ground_truth.index)]
        agrees = [label in GROUND_TRUTH_CODES[ground_truth[i]] for i, label in zip(known["image_id"], known["label"])]
        disagree = known[~np.array(agrees, dtype=bool)]
        report["ground_truth"] = {
            "files_with_ground_truth": int(len(known)),
            "folder_disagrees": int(len(disagree)),
            "disagreements": [
                {"uri": u, "folder": label, "ground_truth": ground_truth[i]}
                for u, label, i in zip(disagree["uri"], disagree["label"], disagree["image_id"])
            ],
        }
    return report


def _resolve(group: pd.DataFrame, ground_truth: pd.Series | None) -> str | None:
    """The label of one content group, or None when it conflicts and cannot be resolved."""
    labels = set(group["label"])
    if len(labels) == 1:
        return labels.pop()
    if ground_truth is None:
        return None
    codes = {ground_truth[i] for i in group["image_id"] if i in ground_truth.index}
    if len(codes) != 1:
        return None
    candidates = labels & set(GROUND_TRUTH_CODES[codes.pop()])
    return candidates.pop() if len(candidates) == 1 else None


def build_manifest(files: pd.DataFrame, ground_truth: pd.Series | None = None) -> pd.DataFrame:
    """One row per unique content: the first file of each group (by uri), its resolved label."""
    rows = []
    dropped = 0
    for _, group in files.sort_values("uri").groupby("sha256", sort=False):
        label = _resolve(group, ground_truth)
        if label is None:
            dropped += 1
            continue
        first = group[group["label"] == label].iloc[0]
        rows.append({"image_id": first["image_id"], "uri": first["uri"], "label": label, "sha256": first["sha256"]})
    if dropped:
        log.info("dropped %d images with conflicting labels", dropped)
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values(["image_id", "sha256"], ignore_index=True)
    if manifest.empty:
        raise DatasetError("no images left after dropping conflicting labels")
    return manifest


def read_lesions(uri: str) -> pd.Series:
    """image id -> lesion id, from a CSV with image_id and lesion_id columns (HAM10000's metadata has both)."""
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{uri}: not a readable CSV ({exc.__class__.__name__})") from None
    missing = sorted({"image_id", "lesion_id"} - set(table.columns))
    if missing:
        raise DatasetError(f"{uri}: a lesion map needs image_id and lesion_id columns; {', '.join(missing)} missing")
    return table.drop_duplicates("image_id").set_index("image_id")["lesion_id"].astype(str)


def split(manifest: pd.DataFrame, val_fraction: float, seed: int, lesions: pd.Series | None = None) -> pd.DataFrame:
    """Adds split = train | val, stratified by label, by group: the image's lesion where `lesions` (image id ->
    lesion id) knows it, else its image id. Rows of one group never straddle."""
    if not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    group = manifest["image_id"] if lesions is None else manifest["image_id"].map(lesions).fillna(manifest["image_id"])
    labels = manifest.groupby(group)["label"].first()
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for label in sorted(labels.unique()):
        members = np.array(sorted(labels[labels == label].index))
        n_val = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val_groups.update(rng.permutation(members)[:n_val])
    out = manifest.copy()
    out["split"] = np.where(group.isin(val_groups), "val", "train")
    return out


def audit_uri(data_uri: str, ground_truth_uri: str | None = None) -> dict:
    ground_truth = read_ground_truth(ground_truth_uri) if ground_truth_uri else None
    return audit(scan(data_uri), ground_truth)


def make_split(
    data_uri: str, out_uri: str, val_fraction: float, seed: int, ground_truth_uri: str | None = None,
    lesions_uri: str | None = None,
) -> pd.DataFrame:
    """Scan, manifest, split; writes out/manifest.parquet and out/audit.json only once all of it succeeded."""
    storage.check_writable(out_uri)
    ground_truth = read_ground_truth(ground_truth_uri) if ground_truth_uri else None
    lesions = read_lesions(lesions_uri) if lesions_uri else None
    files = scan(data_uri)
    manifest = split(build_manifest(files, ground_truth), val_fraction, seed, lesions)
    report = audit(files, ground_truth) | {"split_seed": seed, "val_fraction": val_fraction, "data_uri": data_uri}
    if lesions is not None:
        known = manifest["image_id"].map(lesions).dropna()
        report["lesions"] = {"uri": lesions_uri, "images_with_a_lesion": len(known), "lesions": int(known.nunique())}
    storage.write_bytes(storage.join(out_uri, "audit.json"), json.dumps(report, indent=2).encode())
    storage.write_parquet(storage.join(out_uri, MANIFEST), manifest)
    return manifest


def read_manifest(work_uri: str) -> pd.DataFrame:
    uri = storage.join(work_uri, MANIFEST)
    if not storage.exists(uri):
        raise DatasetError(f"{uri}: no manifest (run `melanoma split` first)")
    return storage.read_parquet(uri)
