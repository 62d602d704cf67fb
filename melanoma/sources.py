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

The outcome store (melanoma/outcomes.py) is a source too, added again whenever it has grown (add_outcomes): each
confirmed image is fetched from where it was scored (image_uri of the scores) and kept in <work>/outcomes/ under its
sha256, so that training never depends on the archive. Its split goes by night, so that the outcome nights used to
evaluate a model are never trained on by it: every night an image was scored on is assigned once to train, val or
test (seeded by the date, recorded in sources.json and never changed), an image goes to the most held-out side of
its nights (test before val before train), and a group (patient, else lesion, else the image) to the most held-out
side of its images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from tqdm import tqdm

from melanoma import archive, dataset, query, storage
from melanoma.config import CLASS_NAMES, MELANOMA, settings

log = logging.getLogger(__name__)

SOURCES = "sources.json"
OUTCOMES = "outcomes"  # the outcome source's name, and the folder of its images in the work dir
SIDES = ("train", "val", "test")  # from least to most held out
FETCH_CHUNK = 256  # confirmed images held in memory at once while they are copied into the work dir
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
    kept, report = _new_groups(rows, manifest)
    kept["split"] = split_groups(kept, val_fraction, test_fraction, seed)
    report |= {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed} | _per_split(kept)
    _append(work_uri, manifest, kept, added | {name: report})
    return report


def _new_groups(rows: pd.DataFrame, manifest: pd.DataFrame, by_id: bool = True) -> tuple[pd.DataFrame, dict]:
    """The rows (with sha256) minus repeated contents, minus every group with an image whose content (or, by_id,
    image id) is already in the manifest; and the counts of what was dropped."""
    copies = rows["sha256"].duplicated()
    rows = rows[~copies]
    touching = rows["sha256"].isin(set(manifest["sha256"]))
    if by_id:
        touching |= rows["image_id"].isin(set(manifest["image_id"]))
    dropped_groups = set(rows.loc[touching, "group"])
    kept = rows[~rows["group"].isin(dropped_groups)].reset_index(drop=True)
    return kept, {
        "rows": int(len(rows) + copies.sum()),
        "duplicate_contents_dropped": int(copies.sum()),
        "groups_touching_work_dir_dropped": len(dropped_groups),
        "images_dropped_with_them": int(rows["group"].isin(dropped_groups).sum()),
    }


def _per_split(kept: pd.DataFrame) -> dict:
    return {
        "per_split": {s: {k: int(v) for k, v in g["source"].value_counts().sort_index().items()} for s, g in kept.groupby("split")},
        "melanomas_per_split": {s: int(g["melanoma"].sum()) for s, g in kept.groupby("split")},
    }


def _append(work_uri: str, manifest: pd.DataFrame, kept: pd.DataFrame, sources: dict) -> None:
    combined = pd.concat([with_source_columns(manifest), kept[ROW_COLUMNS]], ignore_index=True)
    storage.write_parquet(storage.join(work_uri, dataset.MANIFEST), combined)
    storage.write_bytes(storage.join(work_uri, SOURCES), json.dumps(sources, indent=2).encode())


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


def add_outcomes(work_uri: str, outcomes_uri: str, scores_uri: str, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Appends the confirmed images not in the work dir yet (whole groups, as add_source), each fetched into
    <work>/outcomes/, split by night (module docstring). Returns the report; nothing is written when nothing is new."""
    added = read_sources(work_uri)
    manifest = dataset.read_manifest(work_uri)
    rows = outcome_rows(outcomes_uri, scores_uri)
    kept, report = _new_groups(rows, manifest, by_id=False)  # archive file names are no identity: content only
    kept, unreadable = _fetch_into(work_uri, kept)
    nights = dict(added.get(OUTCOMES, {}).get("nights", {}))
    for night in sorted({n for ns in kept["nights"] for n in ns} - set(nights)):
        nights[night] = night_side(night, val_fraction, test_fraction, seed)
    side = kept["nights"].map(lambda ns: max(SIDES.index(nights[n]) for n in ns))
    kept["split"] = side.groupby(kept["group"]).transform("max").map(lambda i: SIDES[i]) if len(kept) else side
    report |= {"unreadable_dropped": unreadable, "val_fraction": val_fraction, "test_fraction": test_fraction,
               "seed": seed, "nights": dict(sorted(nights.items())), **_per_split(kept)}  # fmt: skip
    if len(kept):
        _append(work_uri, manifest, kept, added | {OUTCOMES: report})
    return report


def outcome_rows(outcomes_uri: str, scores_uri: str) -> pd.DataFrame:
    """One row per confirmed image that was scored (image_id, uri, label, melanoma, group, source, sha256, nights):
    uri is where it was first scored, nights every night it was scored on."""
    columns = "sha256, image_id, image_uri, CAST(run_date AS VARCHAR) AS night, diagnosis, confirmed_melanoma, lesion_id, patient_id"
    table = query.sql(scores_uri, f"SELECT {columns} FROM confirmed ORDER BY sha256, night, image_uri", outcomes_uri).to_pandas()
    by_image = table.groupby("sha256", sort=True)
    first = by_image.first()
    patient, lesion = first["patient_id"], first["lesion_id"]
    group = np.where(patient.notna(), "patient:" + patient.fillna(""),
                     np.where(lesion.notna(), "lesion:" + lesion.fillna(""), "image:" + first.index))  # fmt: skip
    label = first["diagnosis"].where(first["diagnosis"].notna(), first["confirmed_melanoma"].map({True: MELANOMA, False: None}))
    return pd.DataFrame({
        "image_id": first["image_id"].to_numpy(),
        "uri": first["image_uri"].to_numpy(),
        "label": label.to_numpy(),
        "melanoma": first["confirmed_melanoma"].astype(int).to_numpy(),
        "group": [f"{OUTCOMES}/{g}" for g in group],
        "source": OUTCOMES,
        "sha256": first.index.to_numpy(),
        "nights": by_image["night"].unique().map(sorted).to_numpy(),
    })


def night_side(night: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """test with probability test_fraction, val with val_fraction, else train: a function of the seed and the
    date alone, so a night's side does not depend on which other nights exist."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{night}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _fetch_into(work_uri: str, rows: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The rows whose image could be read from its scored uri with the scored content, now with uri in
    <work>/outcomes/<sha256><suffix>; and how many could not (each logged)."""
    s = settings()
    targets: list[str | None] = []
    with ThreadPoolExecutor(s.hash_threads) as pool:
        for start in tqdm(range(0, len(rows), FETCH_CHUNK), desc="fetch outcomes", unit="chunk"):
            chunk = rows.iloc[start : start + FETCH_CHUNK]
            fetched = archive.fetch_uris(list(chunk["uri"]), s.fetch_threads)
            copies = [_copy_target(work_uri, uri, sha, data) for uri, sha, data in zip(chunk["uri"], chunk["sha256"], fetched)]
            list(pool.map(lambda pair: storage.write_bytes(*pair), [(t, d) for t, d in zip(copies, fetched) if t]))
            targets += copies
    ok = np.array([t is not None for t in targets], dtype=bool)
    kept = rows[ok].assign(uri=[t for t in targets if t]).reset_index(drop=True)
    return kept, int(len(rows) - len(kept))


def _copy_target(work_uri: str, uri: str, sha: str, data: bytes | storage.StorageError) -> str | None:
    """Where the image of `uri` goes in the work dir; None (logged) when it could not be read or has changed."""
    if isinstance(data, storage.StorageError):
        log.warning("%s: confirmed image dropped: %s", uri, data)
        return None
    if hashlib.sha256(data).hexdigest() != sha:
        log.warning("%s: confirmed image dropped: its content changed since it was scored", uri)
        return None
    suffix = posixpath.splitext(uri.rsplit("#", 1)[-1])[1].lower() or ".jpg"
    return storage.join(work_uri, OUTCOMES, f"{sha}{suffix}")
