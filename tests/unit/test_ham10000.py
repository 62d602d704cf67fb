"""melanoma.ham10000 on a small HAM-like folder made in tmp_path: label mapping, dropping lesions that touch
the 9-class set (by id or by content), lesion-level split, subsampling, and the combined work directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from melanoma import dataset, ham10000, storage, train
from melanoma.config import CLASS_NAMES
from helpers import make_image


def build_ham(root: Path, n_lesions_per_dx: int = 6, images_per_lesion: int = 2) -> pd.DataFrame:
    rows = []
    seed = 1000
    for dx in sorted(ham10000.HAM_TO_CLASS):
        for lesion in range(n_lesions_per_dx):
            for k in range(images_per_lesion):
                seed += 1
                image_id = f"ISIC_{seed:07d}"
                make_image(root / "images" / f"{image_id}.jpg", seed=seed)
                rows.append({"lesion_id": f"HAM_{dx}_{lesion}", "image_id": image_id, "dx": dx})
    meta = pd.DataFrame(rows)
    meta.to_csv(root / ham10000.METADATA)
    return meta


def nine_class_work(tmp_path: Path, ham_root: Path, meta: pd.DataFrame) -> Path:
    """A 9-class work dir whose manifest holds one HAM image by id (mel lesion 0) and one by content only."""
    folder = tmp_path / "nine"
    by_id = meta[(meta["dx"] == "mel") & (meta["lesion_id"] == "HAM_mel_0")].iloc[0]["image_id"]
    (folder / "melanoma").mkdir(parents=True)
    shutil.copyfile(ham_root / "images" / f"{by_id}.jpg", folder / "melanoma" / f"{by_id}.jpg")
    by_content = meta[(meta["dx"] == "nv") & (meta["lesion_id"] == "HAM_nv_1")].iloc[1]["image_id"]
    (folder / "nevus").mkdir(parents=True)
    shutil.copyfile(ham_root / "images" / f"{by_content}.jpg", folder / "nevus" / "ISIC_9999999.jpg")
    for i, label in enumerate(["melanoma", "nevus", "melanoma", "nevus"]):
        make_image(folder / label / f"ISIC_800000{i}.jpg", seed=90 + i)
    work = tmp_path / "work"
    dataset.make_split(str(folder), str(work), 0.5, 42)
    return work


def test_labels_map_into_the_nine_classes(tmp_path):
    build_ham(tmp_path, 2, 1)
    meta = ham10000.read_metadata(str(tmp_path))
    assert set(meta["label"]) <= set(CLASS_NAMES)
    assert meta.set_index("dx")["label"].to_dict() == ham10000.HAM_TO_CLASS
    assert all(Path(u).exists() for u in meta["uri"])


def test_unknown_dx_is_refused(tmp_path):
    pd.DataFrame([{"lesion_id": "L", "image_id": "ISIC_1", "dx": "xyz"}]).to_csv(tmp_path / ham10000.METADATA)
    with pytest.raises(dataset.DatasetError, match="unknown dx 'xyz'"):
        ham10000.read_metadata(str(tmp_path))


def test_lesions_touching_the_nine_class_set_are_dropped_and_no_lesion_straddles(tmp_path):
    ham_root = tmp_path / "ham"
    meta = build_ham(ham_root)
    work = nine_class_work(tmp_path, ham_root, meta)
    out = tmp_path / "combined"
    report = ham10000.build_work(str(work), str(ham_root), str(out), 0.34, 7)
    assert report["dropped_lesions_touching_9class"] == 2
    assert report["dropped_images_touching_9class"] == 4

    manifest = dataset.read_manifest(str(out))
    ham_val = ham10000.read_val(str(out))
    nine = dataset.read_manifest(str(work))
    ham_train = manifest[~manifest["image_id"].isin(nine["image_id"])]
    # the 9-class rows are unchanged; HAM rows are training rows only; HAM validation is elsewhere
    pd.testing.assert_frame_equal(manifest.iloc[: len(nine)].reset_index(drop=True), nine)
    assert set(ham_train["split"]) == {"train"}
    lesion = ham10000.read_metadata(str(ham_root)).set_index("image_id")["lesion_id"]
    train_lesions, val_lesions = set(lesion[ham_train["image_id"]]), set(lesion[ham_val["image_id"]])
    assert not train_lesions & val_lesions
    assert not {"HAM_mel_0", "HAM_nv_1"} & (train_lesions | val_lesions)
    assert not set(ham_val["sha256"]) & set(nine["sha256"])
    assert not set(ham_train["sha256"]) & set(nine["sha256"])
    # every diagnosis has validation lesions; label_index is ready for train.evaluate
    assert set(ham_val["label"]) == set(ham10000.HAM_TO_CLASS.values())
    assert (ham_val["label_index"] == ham_val["label"].map(CLASS_NAMES.index)).all()
    # and training reads the combined manifest: 9-class train + HAM train rows, 9-class val only
    train_rows, val_rows = train.training_tables(str(out))
    assert len(train_rows) == (nine["split"] == "train").sum() + len(ham_train)
    assert set(val_rows["image_id"]) == set(nine.loc[nine["split"] == "val", "image_id"])


def test_split_is_seeded_and_subsampling_keeps_whole_lesions(tmp_path):
    ham_root = tmp_path / "ham"
    build_ham(ham_root, 10, 2)
    meta = ham10000.read_metadata(str(ham_root))
    meta["sha256"] = [ham10000._sha256(u) for u in meta["uri"]]
    empty = pd.DataFrame({"image_id": [], "sha256": []})
    a, _ = ham10000.lesion_split(meta, empty, 0.2, 3)
    b, _ = ham10000.lesion_split(meta, empty, 0.2, 3)
    pd.testing.assert_frame_equal(a, b)
    assert (a[a["split"] == "val"].groupby("label").size() == 4).all()  # 2 of 10 lesions x 2 images
    capped, report = ham10000.lesion_split(meta, empty, 0.2, 3, max_train_per_class=4)
    train_part = capped[capped["split"] == "train"]
    assert (train_part.groupby("label").size() == 4).all()
    assert (train_part.groupby("lesion_id").size() == 2).all()  # whole lesions
    assert report["train_images_subsampled_away"] == 7 * (16 - 4)
    only_nevus, _ = ham10000.lesion_split(meta, empty, 0.2, 3, max_train_per_class={"nevus": 6})
    sizes = only_nevus[only_nevus["split"] == "train"].groupby("label").size()
    assert sizes["nevus"] == 6 and (sizes.drop("nevus") == 16).all()
    pd.testing.assert_frame_equal(
        capped[capped["split"] == "val"].reset_index(drop=True), a[a["split"] == "val"].reset_index(drop=True)
    )


def test_bad_val_fraction(tmp_path):
    with pytest.raises(dataset.DatasetError, match="val_fraction"):
        ham10000.lesion_split(pd.DataFrame(columns=["image_id", "lesion_id", "label", "uri", "sha256"]),
                              pd.DataFrame({"image_id": [], "sha256": []}), 1.5, 0)


def test_part_of_ham_validation_joins_the_manifest_validation_and_the_rest_stays_untouched(tmp_path):
    ham_root = tmp_path / "ham"
    meta = build_ham(ham_root, 10, 2)
    work = nine_class_work(tmp_path, ham_root, meta)
    ham10000.build_work(str(work), str(ham_root), str(tmp_path / "plain"), 0.4, 7)
    report = ham10000.build_work(str(work), str(ham_root), str(tmp_path / "mixed"), 0.4, 7, val_to_manifest=0.5)
    whole_val = ham10000.read_val(str(tmp_path / "plain"))
    test = ham10000.read_val(str(tmp_path / "mixed"))
    manifest, plain_manifest = dataset.read_manifest(str(tmp_path / "mixed")), dataset.read_manifest(str(tmp_path / "plain"))
    nine = dataset.read_manifest(str(work))
    moved = manifest[(manifest["split"] == "val") & ~manifest["image_id"].isin(nine["image_id"])]
    # the HAM validation rows are split between the manifest's validation and the test set, by lesion
    assert sorted(moved["image_id"].tolist() + test["image_id"].tolist()) == sorted(whole_val["image_id"])
    lesion = meta.set_index("image_id")["lesion_id"]
    assert not set(lesion[moved["image_id"]]) & set(lesion[test["image_id"]])
    assert report["val_to_manifest"]["lesions"] == len(set(lesion[moved["image_id"]])) > 0
    assert set(moved["label"]) == set(test["label"]) == set(ham10000.HAM_TO_CLASS.values())  # every class both sides
    # training rows are those of the plain build; validation now covers both sources
    pd.testing.assert_frame_equal(
        manifest[manifest["split"] == "train"].reset_index(drop=True),
        plain_manifest[plain_manifest["split"] == "train"].reset_index(drop=True),
    )
    _, val_rows = train.training_tables(str(tmp_path / "mixed"))
    assert len(val_rows) == (nine["split"] == "val").sum() + len(moved)
    with pytest.raises(dataset.DatasetError, match="val_to_manifest"):
        ham10000.build_work(str(work), str(ham_root), str(tmp_path / "bad"), 0.4, 7, val_to_manifest=1.0)


def test_cli_builds_the_mixed_validation_work_dir(tmp_path, capsys):
    from melanoma import cli

    ham_root = tmp_path / "ham"
    meta = build_ham(ham_root, 10, 2)
    work = nine_class_work(tmp_path, ham_root, meta)
    out = tmp_path / "out"
    assert cli.main(["ham10000", str(work), "--ham", str(ham_root), "--out", str(out), "--val-fraction", "0.4",
                     "--max-train-nevus", "4"]) == 0
    manifest, test = dataset.read_manifest(str(out)), ham10000.read_val(str(out))
    report = json.loads((out / "ham_audit.json").read_text())
    moved = sum(report["val_to_manifest"]["per_class"].values())
    assert report["val_to_manifest"]["fraction"] == 0.5 and moved > 0
    assert len(manifest) == len(dataset.read_manifest(str(work))) + report["per_split"]["train"]["nevus"] + moved + sum(
        n for label, n in report["per_split"]["train"].items() if label != "nevus")
    assert report["per_split"]["train"]["nevus"] == 4
    assert f"{moved} validation images joined the manifest, {len(test)} held out" in capsys.readouterr().out
    assert cli.main(["ham10000", str(tmp_path / "missing"), "--ham", str(ham_root), "--out", str(tmp_path / "o2")]) == 1
    assert not (tmp_path / "o2" / "manifest.parquet").exists()
