"""melanoma.augment: seeded, reproducible Augmentor rebalancing that only ever draws from the training split.

The dataset is generated in tmp_path: training images are 40x30 or 30x40, validation images 52x52 and
named ISIC_V*, so a validation source would show both in the records and in the output sizes.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from melanoma import augment, dataset, storage
from helpers import make_image

MEL, NEV, VASC = "melanoma", "nevus", "vascular lesion"
TRAIN_COUNTS = {MEL: 5, NEV: 3, VASC: 2}
VAL_SIZE = (52, 52)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("augment") / "data"
    seed = 0
    for label, n in TRAIN_COUNTS.items():
        for i in range(n):
            seed += 1
            make_image(root / label / f"ISIC_T{seed:06d}.jpg", size=(40, 30) if i % 2 else (30, 40), seed=seed)
        for i in range(2):  # validation images: more of them than some classes have for training
            seed += 1
            make_image(root / label / f"ISIC_V{seed:06d}.jpg", size=VAL_SIZE, seed=seed)
    m = dataset.build_manifest(dataset.scan(str(root)))
    m["split"] = ["val" if i.startswith("ISIC_V") else "train" for i in m["image_id"]]
    assert (m["split"] == "val").sum() == 6 and len(m) == 16
    return m


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def listing(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below root."""
    return {p.relative_to(root).as_posix(): sha256(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def without_uri(records: pd.DataFrame) -> list[dict]:
    return records.drop(columns=["uri"]).to_dict("records")


# ---------------------------------------------------------------- plan


def test_plan_defaults_to_growing_every_class_to_the_largest(manifest):
    train = manifest[manifest["split"] == "train"]
    assert augment.plan(train) == {MEL: 0, NEV: 2, VASC: 3}


def test_plan_with_a_target_never_removes_and_with_add_adds_the_same_to_each(manifest):
    train = manifest[manifest["split"] == "train"]
    assert augment.plan(train, target=4) == {MEL: 0, NEV: 1, VASC: 2}
    assert augment.plan(train, target=7) == {MEL: 2, NEV: 4, VASC: 5}
    assert augment.plan(train, add=3) == {MEL: 3, NEV: 3, VASC: 3}
    assert augment.plan(train, add=0) == {MEL: 0, NEV: 0, VASC: 0}


# ---------------------------------------------------------------- augment


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory):
    """Three runs: seed 11 twice into different directories, seed 12 once; 4 samples per class."""
    base = tmp_path_factory.mktemp("augment-runs")
    out = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        out[name] = (base / name, augment.augment(manifest, str(base / name), seed, add=4))
    return out


def test_same_seed_writes_byte_identical_files_names_and_records(runs):
    (dir_a, rec_a), (dir_b, rec_b) = runs["a"], runs["b"]
    files_a, files_b = listing(dir_a), listing(dir_b)

    assert len(rec_a) == 12
    samples_a = {k: v for k, v in files_a.items() if k != augment.RECORDS}
    assert len(samples_a) == 12 and all(k.endswith(".jpg") for k in samples_a)
    assert sorted(files_a) == sorted(files_b)
    assert {k: v for k, v in files_b.items() if k != augment.RECORDS} == samples_a
    assert without_uri(rec_a) == without_uri(rec_b)
    assert [Path(u).relative_to(dir_a).as_posix() for u in rec_a["uri"]] == [Path(u).relative_to(dir_b).as_posix() for u in rec_b["uri"]]


def test_a_different_seed_gives_different_samples(runs):
    rec_a, rec_c = runs["a"][1], runs["c"][1]
    assert sorted(rec_a["sha256"]) != sorted(rec_c["sha256"])
    assert len(set(rec_a["sha256"]) & set(rec_c["sha256"])) < len(rec_a) // 2


def test_only_training_rows_are_sources(runs, manifest):
    val = manifest[manifest["split"] == "val"]
    train = manifest[manifest["split"] == "train"]
    for _, records in runs.values():
        assert not set(records["source_image_id"]) & set(val["image_id"])
        assert not set(records["source_sha256"]) & set(val["sha256"])
        labels_of = dict(zip(train["image_id"], train["label"]))
        assert all(labels_of[s] == label for s, label in zip(records["source_image_id"], records["label"]))
        shas_of = dict(zip(train["image_id"], train["sha256"]))
        assert all(shas_of[s] == h for s, h in zip(records["source_image_id"], records["source_sha256"]))
    # Over 36 draws from classes of 5, 3 and 2 sources, every training image is used at least once.
    used = set().union(*(set(r["source_image_id"]) for _, r in runs.values()))
    assert used == set(train["image_id"])


def test_record_files_exist_match_their_hash_and_keep_the_source_size(runs, manifest):
    sizes = {r.image_id: Image.open(r.uri).size for r in manifest.itertuples()}
    out_dir, records = runs["a"]
    for r in records.itertuples():
        data = Path(r.uri).read_bytes()
        assert sha256(data) == r.sha256
        assert Path(r.uri).parent == out_dir / r.label
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == sizes[r.source_image_id] != VAL_SIZE
        assert r.image_id.startswith(f"{r.source_image_id}_aug_{r.label.replace(' ', '_')}_")
    assert records["image_id"].is_unique
    pd.testing.assert_frame_equal(storage.read_parquet(str(out_dir / augment.RECORDS)), records)


def test_augment_work_dir_reads_the_manifest_and_read_augmented_gives_the_records(manifest, tmp_path):
    work = tmp_path / "work"
    storage.write_parquet(str(work / dataset.MANIFEST), manifest)
    assert augment.read_augmented(str(work)) is None

    records = augment.augment_work_dir(str(work), seed=5)  # default plan: up to the largest class (5)

    assert records["label"].value_counts().to_dict() == {NEV: 2, VASC: 3}
    assert all(Path(u).is_relative_to(work / augment.AUGMENTED_DIR) for u in records["uri"])
    pd.testing.assert_frame_equal(augment.read_augmented(str(work)), records)


@pytest.mark.integration
def test_augment_to_s3_writes_the_same_bytes_as_locally(s3, runs, manifest):
    bucket = s3.make_bucket(f"augment-{uuid.uuid4().hex[:10]}")
    out = f"{bucket}/work/augmented"

    records = augment.augment(manifest, out, 11, add=4)

    local = runs["a"][1]
    assert without_uri(records) == without_uri(local)
    assert all(u.startswith(f"{out}/") for u in records["uri"])
    assert [sha256(storage.read_bytes(u)) for u in records["uri"]] == local["sha256"].tolist()
    pd.testing.assert_frame_equal(storage.read_parquet(f"{out}/{augment.RECORDS}"), records)
    assert len(storage.list_files(out, suffixes=(".jpg",))) == 12
