"""Adding labelled sources (melanoma/sources.py, melanoma/ham10000.py) on small folders made in tmp_path:
bad sources stop with one line naming the file and line; contents already in the work dir are dropped with
their whole lesion or patient; no group, lesion, patient or content lands on two sides of the split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from melanoma import dataset, ham10000, sources, train
from helpers import make_image

HEADER = ["image_id", "label", "melanoma", "lesion_id", "patient_id"]


def nine_class_work(tmp_path: Path, copies: dict[str, Path] | None = None) -> Path:
    """A 9-class work dir of 8 generated images, plus `copies` ({class folder: image file}) copied in."""
    folder = tmp_path / "nine"
    for i, label in enumerate(["melanoma", "nevus"] * 4):
        make_image(folder / label / f"ISIC_800000{i}.jpg", seed=90 + i)
    for n, (label, path) in enumerate((copies or {}).items()):
        (folder / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / label / f"ISIC_990000{n}.jpg")
    work = tmp_path / "work"
    dataset.make_split(str(folder), str(work), 0.5, 42)
    return work


def write_source(root: Path, rows: list[dict], seed: int = 2000) -> tuple[str, str]:
    for n, row in enumerate(rows):
        make_image(root / "images" / f"{row['image_id']}.jpg", seed=seed + n)
    pd.DataFrame(rows, columns=HEADER + [c for c in rows[0] if c not in HEADER]).to_csv(root / "labels.csv", index=False)
    return str(root / "labels.csv"), str(root / "images")


def patients_source(n_patients: int = 20, per_patient: int = 3) -> list[dict]:
    """ISIC-2020-like: patients with several lesions, most only known as not melanoma, every fourth with one."""
    rows = []
    for p in range(n_patients):
        for k in range(per_patient):
            mel = int(p % 4 == 0 and k == 0)
            rows.append({"image_id": f"ISIC_5{p:03d}{k}", "label": "melanoma" if mel else "", "melanoma": mel,
                         "lesion_id": "", "patient_id": f"IP_{p:04d}", "source": "isic2020"})
    return rows


def add(work: Path, csv: str, images: str, name: str = "extra", val: float = 0.2, test: float = 0.2) -> dict:
    return sources.add_source(str(work), name, lambda: sources.read_labels(csv, images, name), val, test, 42)


def test_a_source_is_split_by_patient_with_no_group_on_two_sides(tmp_path):
    work = nine_class_work(tmp_path)
    csv, images = write_source(tmp_path / "src", patients_source())
    report = add(work, csv, images)
    manifest = dataset.read_manifest(str(work))
    extra = manifest[manifest["source"] == "isic2020"]
    assert len(extra) == 60
    assert (extra.groupby("group")["split"].nunique() == 1).all()
    assert set(extra["split"]) == {"train", "val", "test"}
    assert report["melanomas_per_split"] == {s: int(g["melanoma"].sum()) for s, g in extra.groupby("split")}
    assert all(report["melanomas_per_split"][s] >= 1 for s in ("train", "val", "test"))  # stratified
    # images known only as "not melanoma" keep no class; melanomas get theirs
    assert extra.loc[extra["melanoma"] == 0, "label"].isna().all()
    assert (extra.loc[extra["melanoma"] == 1, "label"] == "melanoma").all()
    # the 9-class rows are kept as they were, with the new columns filled in
    nine = manifest[manifest["source"] == "isic-9class"]
    assert len(nine) == 8 and set(nine["split"]) == {"train", "val"}


def test_contents_already_in_the_work_dir_drop_their_whole_lesion(tmp_path):
    rows = [{"image_id": f"ISIC_6{n:04d}", "label": "nevus", "melanoma": 0, "lesion_id": f"L{n // 2}", "patient_id": ""}
            for n in range(12)]
    csv, images = write_source(tmp_path / "src", rows)
    work = nine_class_work(tmp_path, {"nevus": Path(images) / "ISIC_60003.jpg"})  # lesion L1 by content
    report = add(work, csv, images, val=0.25, test=0.25)
    extra = dataset.read_manifest(str(work)).query("source == 'extra'")
    assert report["groups_touching_work_dir_dropped"] == 1 and report["images_dropped_with_them"] == 2
    assert not extra["image_id"].isin(["ISIC_60002", "ISIC_60003"]).any()
    assert len(extra) == 10


def test_duplicate_contents_inside_a_source_are_kept_once(tmp_path):
    rows = [{"image_id": f"ISIC_7{n:04d}", "label": "nevus", "melanoma": 0, "lesion_id": "", "patient_id": ""} for n in range(10)]
    csv, images = write_source(tmp_path / "src", rows)
    shutil.copyfile(Path(images) / "ISIC_70000.jpg", Path(images) / "ISIC_70001.jpg")
    report = add(nine_class_work(tmp_path), csv, images)
    assert report["duplicate_contents_dropped"] == 1


def test_a_source_added_twice_is_skipped(tmp_path):
    work = nine_class_work(tmp_path)
    csv, images = write_source(tmp_path / "src", patients_source(8, 2))
    add(work, csv, images)
    before = dataset.read_manifest(str(work))
    again = add(work, csv, images)
    assert again["skipped"] is True
    pd.testing.assert_frame_equal(dataset.read_manifest(str(work)), before)
    assert list(json.loads((work / sources.SOURCES).read_text())) == ["extra"]


def test_training_tables_mark_images_without_a_class(tmp_path):
    work = nine_class_work(tmp_path)
    csv, images = write_source(tmp_path / "src", patients_source())
    add(work, csv, images)
    train_rows, val_rows = train.training_tables(str(work))
    unlabelled = train_rows[train_rows["label"].isna()]
    assert len(unlabelled) > 0 and (unlabelled["label_index"] == -1).all()
    assert not set(train_rows["group"]) & set(val_rows["group"])
    test = dataset.read_manifest(str(work)).query("split == 'test'")
    assert not set(test["image_id"]) & (set(train_rows["image_id"]) | set(val_rows["image_id"]))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"image_id": "ISIC_1", "label": "nevus", "melanoma": 0, "lesion_id": ""}], r"labels.csv: missing column patient_id"),
        ([{"image_id": "ISIC_1", "label": "freckle", "melanoma": 0, "lesion_id": "", "patient_id": ""}],
         r"labels.csv line 2: label 'freckle' is not one of the 9 classes"),
        ([{"image_id": "ISIC_1", "label": "nevus", "melanoma": "maybe", "lesion_id": "", "patient_id": ""}],
         r"labels.csv line 2: melanoma must be 0 or 1, got 'maybe'"),
        ([{"image_id": "ISIC_1", "label": "nevus", "melanoma": 1, "lesion_id": "", "patient_id": ""}],
         r"labels.csv line 2: label 'nevus' contradicts melanoma=1"),
    ],
)
def test_bad_sources_stop_with_one_line(tmp_path, rows, message):
    work = nine_class_work(tmp_path)
    root = tmp_path / "src"
    make_image(root / "images" / "ISIC_1.jpg")
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    before = (work / dataset.MANIFEST).read_bytes()
    with pytest.raises(dataset.DatasetError, match=message) as caught:
        add(work, str(root / "labels.csv"), str(root / "images"))
    assert "\n" not in str(caught.value)
    assert (work / dataset.MANIFEST).read_bytes() == before  # nothing written


def test_a_row_without_its_image_names_file_and_line(tmp_path):
    work = nine_class_work(tmp_path)
    rows = [{"image_id": "ISIC_1", "label": "nevus", "melanoma": 0, "lesion_id": "", "patient_id": ""},
            {"image_id": "ISIC_2", "label": "nevus", "melanoma": 0, "lesion_id": "", "patient_id": ""}]
    root = tmp_path / "src"
    make_image(root / "images" / "ISIC_1.jpg")
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    with pytest.raises(dataset.DatasetError, match=r"labels.csv line 3: no image file ISIC_2.jpg under .*images"):
        add(work, str(root / "labels.csv"), str(root / "images"))


def test_ham10000_is_a_source_split_by_lesion(tmp_path):
    root = tmp_path / "ham"
    rows = []
    for n, dx in enumerate(sorted(ham10000.HAM_TO_CLASS) * 6):
        for k in range(2):
            image_id = f"ISIC_3{n:03d}{k}"
            make_image(root / "images" / f"{image_id}.jpg", seed=3000 + 2 * n + k)
            rows.append({"lesion_id": f"HAM_{n:04d}", "image_id": image_id, "dx": dx})
    pd.DataFrame(rows).to_csv(root / ham10000.METADATA)
    work = nine_class_work(tmp_path)
    sources.add_source(str(work), ham10000.NAME, lambda: ham10000.read_source(str(root)), 0.2, 0.2, 42)
    ham = dataset.read_manifest(str(work)).query("source == 'ham10000'")
    assert len(ham) == 84
    assert set(ham["label"]) == set(ham10000.HAM_TO_CLASS.values())
    assert (ham.groupby("group")["split"].nunique() == 1).all()
    assert (ham["melanoma"] == (ham["label"] == "melanoma")).all()


def test_ham10000_metadata_with_an_unknown_diagnosis_is_one_line(tmp_path):
    pd.DataFrame([{"lesion_id": "L", "image_id": "ISIC_1", "dx": "xyz"}]).to_csv(tmp_path / ham10000.METADATA)
    with pytest.raises(dataset.DatasetError, match="HAM10000_metadata.csv: unknown dx 'xyz'"):
        ham10000.read_source(str(tmp_path))


def test_the_cli_adds_a_source_and_refuses_labels_without_images(tmp_path, capsys):
    from melanoma import cli

    work = nine_class_work(tmp_path)
    csv, images = write_source(tmp_path / "clinic-a", patients_source(8, 2))
    assert cli.main(["add-source", str(work), "--labels", csv, "--images", images]) == 0
    out = capsys.readouterr().out
    assert out.startswith("clinic-a: ") and "test (" in out
    with pytest.raises(SystemExit) as usage:
        cli.main(["add-source", str(work), "--labels", csv])
    assert usage.value.code == 2
    assert "--labels needs --images" in capsys.readouterr().err
