"""The data spine on the real shared ISIC Train folder: audit numbers checked against an independent
os.walk + sha256 count (locally and through S3), and the leak-free property of split + augment proved
at id level and at content level."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

from melanoma import cli, dataset, storage
from melanoma.config import IMAGE_SUFFIXES

pytestmark = pytest.mark.integration

COUNT_KEYS = ("files", "unique_images", "duplicate_groups", "conflicting_groups")


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def independent_audit(root: Path) -> dict:
    """Counts from a plain walk: every non-hidden file under <root>/<class>/, grouped by content hash."""
    folders_of = defaultdict(list)  # sha256 -> class folder of each copy
    per_class = defaultdict(int)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            folder = os.path.relpath(dirpath, root)
            folders_of[sha256_file(os.path.join(dirpath, name))].append(folder)
            per_class[folder] += 1
    return {
        "files": sum(len(v) for v in folders_of.values()),
        "unique_images": len(folders_of),
        "duplicate_groups": sum(1 for v in folders_of.values() if len(v) > 1),
        "conflicting_groups": sum(1 for v in folders_of.values() if len(set(v)) > 1),
        "files_per_class": dict(sorted(per_class.items())),
    }


def melanoma_cli() -> list[str]:
    exe = shutil.which("melanoma", path=str(Path(sys.executable).parent)) or shutil.which("melanoma")
    return [exe] if exe else [sys.executable, "-m", "melanoma.cli"]


def cli_audit_json(data: str) -> dict:
    """`melanoma audit <data> --json` as a real subprocess (inheriting the AWS_* variables when S3 is up)."""
    result = subprocess.run([*melanoma_cli(), "audit", data, "--json"], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    for key in COUNT_KEYS:
        assert type(report[key]) is int, (key, report[key])
    return report


@pytest.fixture(scope="module")
def train_dir(shared_data) -> Path:
    return shared_data / "isic-9class" / "Train"


@pytest.fixture(scope="module")
def expected(train_dir) -> dict:
    return independent_audit(train_dir)


def test_independent_count_matches_the_documented_dataset(expected):
    assert expected["files"] > 0 and len(expected["files_per_class"]) == 9
    if expected["files"] == 2241:  # the documented 9-class Train folder (not a MELANOMA_SHARED_DATA substitute)
        assert {k: expected[k] for k in COUNT_KEYS} == {
            "files": 2241, "unique_images": 2100, "duplicate_groups": 141, "conflicting_groups": 137,
        }  # fmt: skip


def test_cli_audit_json_matches_an_independent_walk(train_dir, expected):
    report = cli_audit_json(str(train_dir))

    assert {k: report[k] for k in COUNT_KEYS} == {k: expected[k] for k in COUNT_KEYS}
    assert report["files_per_class"] == expected["files_per_class"]
    assert len(report["conflicts"]) == expected["conflicting_groups"]


def test_s3_audit_gives_identical_numbers(s3, train_dir, expected):
    uri = f"{s3.make_bucket(f'spine-{uuid.uuid4().hex[:10]}')}/isic-9class/Train"
    assert s3.upload_dir(train_dir, uri) == expected["files"]

    report = cli_audit_json(uri)

    assert {k: report[k] for k in COUNT_KEYS} == {k: expected[k] for k in COUNT_KEYS}
    assert report["files_per_class"] == expected["files_per_class"]
    assert all(f.startswith(f"{uri}/") for c in report["conflicts"] for f in c["files"])


def test_split_and_augment_leak_no_validation_image_into_training(train_dir, tmp_path, capsys):
    work = tmp_path / "work"
    assert cli.main(["split", str(train_dir), "--out", str(work), "--seed", "42", "--val-fraction", "0.2"]) == 0
    assert cli.main(["augment", str(work), "--add-per-class", "10", "--seed", "42"]) == 0
    capsys.readouterr()

    manifest = dataset.read_manifest(str(work))
    augmented = storage.read_parquet(str(work / "augmented" / "augmented.parquet"))
    train = manifest[manifest["split"] == "train"]
    val = manifest[manifest["split"] == "val"]
    assert len(val) > 0 and len(train) > 0
    assert len(augmented) == 10 * train["label"].nunique()

    # id level: training = manifest train rows + augmented samples (and the images they were made from)
    val_ids = set(val["image_id"])
    training_ids = set(train["image_id"]) | set(augmented["image_id"]) | set(augmented["source_image_id"])
    assert not val_ids & training_ids
    assert set(augmented["source_image_id"]) <= set(train["image_id"])

    # content level, hashing the files themselves (duplicates exist under different names)
    val_shas = {sha256_file(u) for u in val["uri"]}
    train_shas = {sha256_file(u) for u in train["uri"]}
    sample_shas = {sha256_file(u) for u in augmented["uri"]}
    source_uri = dict(zip(train["image_id"], train["uri"]))
    source_shas = {sha256_file(source_uri[s]) for s in augmented["source_image_id"]}
    assert len(val_shas) == len(val) and len(train_shas) == len(train)
    assert not val_shas & (train_shas | sample_shas | source_shas)
    assert set(augmented["sha256"]) == sample_shas
    assert set(augmented["source_sha256"]) <= train_shas

    # every file of the Train folder whose content is a validation image is absent from training by id too
    for dirpath, _, filenames in os.walk(train_dir):
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES) and sha256_file(os.path.join(dirpath, name)) in val_shas:
                iid = dataset.image_id(name)
                assert iid not in set(augmented["source_image_id"]), (dirpath, name)
                same_id_in_train = train[train["image_id"] == iid]
                assert not set(same_id_in_train["sha256"]) & val_shas, (dirpath, name)

    # every class with at least two ids has both splits
    ids = manifest.groupby("image_id").agg(label=("label", "first"), split=("split", "first"))
    for label, group in ids.groupby("label"):
        if len(group) >= 2:
            assert set(group["split"]) == {"train", "val"}, label


def test_split_by_lesion_keeps_every_ham_lesion_on_one_side(train_dir, shared_data, tmp_path, capsys):
    """1,381 of the 9-class images are HAM10000 photos; split by image id, some lesions have photos on both sides."""
    meta = shared_data / "ham10000" / "HAM10000_metadata.csv"
    work = tmp_path / "work"
    assert cli.main(["split", str(train_dir), "--out", str(work), "--lesions", str(meta), "--seed", "42"]) == 0
    capsys.readouterr()

    manifest = dataset.read_manifest(str(work))
    lesion = manifest["image_id"].map(dataset.read_lesions(str(meta)))
    known = manifest[lesion.notna()]
    assert len(known) > 1000
    assert (known.groupby(lesion.dropna())["split"].nunique() == 1).all()
    report = json.loads((work / "audit.json").read_text())
    assert report["lesions"]["images_with_a_lesion"] == len(known)
    assert report["lesions"]["lesions"] == lesion.nunique()

    by_id = dataset.split(manifest.drop(columns="split"), 0.2, 42)
    assert (by_id[lesion.notna()].groupby(lesion.dropna())["split"].nunique() > 1).sum() > 0
