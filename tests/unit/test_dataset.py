"""melanoma.dataset and the `audit` / `split` commands on small class-folder datasets generated in tmp_path.

Every image is a real JPEG written by make_image; duplicates are byte copies made with shutil.copyfile, so
the expected counts below are known exactly by construction.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from melanoma import cli, dataset, storage
from melanoma.dataset import DatasetError
from melanoma.storage import StorageError
from helpers import make_image

MEL, NEV, PBK, SEB = "melanoma", "nevus", "pigmented benign keratosis", "seborrheic keratosis"


# ---------------------------------------------------------------- the crafted dataset


def build_crafted(root: Path) -> Path:
    """13 files, 9 contents:

    c2 twice inside melanoma (ISIC_0000002.jpg and its download-tool copy ISIC_0000002(1).jpg),
    c3 in melanoma and nevus (conflict), c6 in melanoma and nevus (conflict),
    c7 in pigmented benign keratosis and seborrheic keratosis (conflict), everything else single.
    """
    layout = {
        MEL: {"ISIC_0000001.jpg": 1, "ISIC_0000002.jpg": 2, "ISIC_0000002(1).jpg": 2, "ISIC_0000003.jpg": 3, "ISIC_0000006.jpg": 6},
        NEV: {"ISIC_0000003.jpg": 3, "ISIC_0000004.jpg": 4, "ISIC_0000005.jpg": 5, "ISIC_0000006.jpg": 6},
        PBK: {"ISIC_0000007.jpg": 7, "ISIC_0000010.jpg": 10},
        SEB: {"ISIC_0000007.jpg": 7, "ISIC_0000011.jpg": 11},
    }
    originals: dict[int, Path] = {}
    for label, files in layout.items():
        for name, content in files.items():
            target = root / label / name
            if content in originals:
                copy(originals[content], target)
            else:
                originals[content] = make_image(target, size=(24, 16), seed=content)
    return root


GROUND_TRUTH = {
    "ISIC_0000001": "MEL",
    "ISIC_0000002": "MEL",
    "ISIC_0000003": "MEL",  # conflict melanoma/nevus: names exactly one folder -> resolved to melanoma
    "ISIC_0000004": "MEL",  # in nevus only: a folder-vs-ground-truth disagreement, the folder label stays
    # ISIC_0000005: no ground truth
    "ISIC_0000006": "BCC",  # conflict melanoma/nevus: names neither -> dropped
    "ISIC_0000007": "BKL",  # conflict PBK/SEB: BKL matches both -> unresolved, dropped
    "ISIC_0000010": "BKL",
    "ISIC_0000011": "BKL",
}


@pytest.fixture
def crafted(tmp_path) -> Path:
    return build_crafted(tmp_path / "data")


@pytest.fixture
def ground_truth_csv(tmp_path) -> Path:
    path = tmp_path / "gt.csv"
    pd.DataFrame({"image": list(GROUND_TRUTH), "label": list(GROUND_TRUTH.values())}).to_csv(path, index=False)
    return path


def copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def rel(uri: str, root: Path) -> str:
    return Path(uri).relative_to(root).as_posix()


# ---------------------------------------------------------------- scan, ids, audit


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ISIC_0025509(1).jpg", "ISIC_0025509"),
        ("ISIC_0025509 (2).jpg", "ISIC_0025509"),
        ("ISIC_0025509(12).jpeg", "ISIC_0025509"),
        ("ISIC_0025509.jpg", "ISIC_0025509"),
        ("ISIC_0025509.PNG", "ISIC_0025509"),
        ("ISIC_(1)_0025509.jpg", "ISIC_(1)_0025509"),  # only a trailing "(n)" is a copy marker
        ("ISIC_0025509(x).jpg", "ISIC_0025509(x)"),
    ],
)
def test_image_id_strips_only_a_trailing_copy_number(name, expected):
    assert dataset.image_id(name) == expected


def test_scan_gives_one_row_per_file_with_its_folder_label_and_content_hash(crafted):
    files = dataset.scan(str(crafted))

    assert len(files) == 13
    assert list(files.columns[:3]) == ["uri", "label", "image_id"]
    copy = files[files["uri"].str.endswith("ISIC_0000002(1).jpg")].iloc[0]
    original = files[files["uri"].str.endswith(f"{MEL}/ISIC_0000002.jpg")].iloc[0]
    assert copy["image_id"] == original["image_id"] == "ISIC_0000002"
    assert copy["sha256"] == original["sha256"]
    assert copy["label"] == MEL
    assert copy["bytes"] == (crafted / MEL / "ISIC_0000002(1).jpg").stat().st_size
    assert files["sha256"].nunique() == 9


def test_audit_counts_duplicates_and_conflicts_exactly(crafted):
    report = dataset.audit(dataset.scan(str(crafted)))

    assert report["files"] == 13
    assert report["unique_images"] == 9
    assert report["duplicate_groups"] == 4  # c2 (inside melanoma), c3, c6, c7
    assert report["duplicate_files"] == 4
    assert report["conflicting_groups"] == 3  # c3, c6, c7 (c2 is a duplicate, not a conflict)
    assert report["files_per_class"] == {MEL: 5, NEV: 4, PBK: 2, SEB: 2}
    conflicts = sorted((tuple(rel(u, crafted) for u in c["files"]), tuple(c["labels"])) for c in report["conflicts"])
    assert conflicts == [
        ((f"{MEL}/ISIC_0000003.jpg", f"{NEV}/ISIC_0000003.jpg"), (MEL, NEV)),
        ((f"{MEL}/ISIC_0000006.jpg", f"{NEV}/ISIC_0000006.jpg"), (MEL, NEV)),
        ((f"{PBK}/ISIC_0000007.jpg", f"{SEB}/ISIC_0000007.jpg"), (PBK, SEB)),
    ]
    assert "ground_truth" not in report


def test_audit_lists_folder_vs_ground_truth_disagreements(crafted, ground_truth_csv):
    report = dataset.audit_uri(str(crafted), str(ground_truth_csv))

    gt = report["ground_truth"]
    assert gt["files_with_ground_truth"] == 12  # every file but nevus/ISIC_0000005
    assert gt["folder_disagrees"] == 4
    found = sorted((rel(d["uri"], crafted), d["folder"], d["ground_truth"]) for d in gt["disagreements"])
    assert found == [
        (f"{MEL}/ISIC_0000006.jpg", MEL, "BCC"),
        (f"{NEV}/ISIC_0000003.jpg", NEV, "MEL"),
        (f"{NEV}/ISIC_0000004.jpg", NEV, "MEL"),
        (f"{NEV}/ISIC_0000006.jpg", NEV, "BCC"),
    ]  # BKL agrees with both the PBK and the SEB folder, so ISIC_0000007/10/11 are not listed


def test_one_hot_ground_truth_reads_like_the_label_layout(tmp_path, ground_truth_csv):
    codes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    one_hot = pd.DataFrame([{"image": i, **{c: float(c == code) for c in codes}} for i, code in GROUND_TRUTH.items()])
    one_hot.to_csv(tmp_path / "onehot.csv", index=False)

    a = dataset.read_ground_truth(str(tmp_path / "onehot.csv"))
    b = dataset.read_ground_truth(str(ground_truth_csv))

    assert a.to_dict() == b.to_dict() == GROUND_TRUTH


# ---------------------------------------------------------------- manifest: dedup, conflicts, ground truth


def test_manifest_without_ground_truth_keeps_one_row_per_content_and_drops_every_conflict(crafted):
    manifest = dataset.build_manifest(dataset.scan(str(crafted)))

    assert list(manifest.columns) == dataset.MANIFEST_COLUMNS
    assert manifest["sha256"].is_unique
    assert dict(zip(manifest["image_id"], manifest["label"])) == {
        "ISIC_0000001": MEL,
        "ISIC_0000002": MEL,
        "ISIC_0000004": NEV,
        "ISIC_0000005": NEV,
        "ISIC_0000010": PBK,
        "ISIC_0000011": SEB,
    }


def test_manifest_with_ground_truth_resolves_only_a_conflict_it_names_exactly_one_folder_of(crafted, ground_truth_csv):
    files = dataset.scan(str(crafted))
    manifest = dataset.build_manifest(files, dataset.read_ground_truth(str(ground_truth_csv)))

    labels = dict(zip(manifest["image_id"], manifest["label"]))
    assert labels["ISIC_0000003"] == MEL  # MEL names the melanoma folder only: resolved
    assert "ISIC_0000006" not in labels  # BCC names neither folder: dropped
    assert "ISIC_0000007" not in labels  # BKL names both folders: still ambiguous, dropped
    assert labels["ISIC_0000004"] == NEV  # not a conflict: the folder label is kept even where GT disagrees
    assert len(manifest) == 7
    row = manifest[manifest["image_id"] == "ISIC_0000003"].iloc[0]
    assert rel(row["uri"], crafted) == f"{MEL}/ISIC_0000003.jpg"  # the file from the resolved folder


def test_conflict_between_copies_under_different_ids_with_contradicting_ground_truth_is_dropped(tmp_path):
    root = tmp_path / "data"
    make_image(root / MEL / "ISIC_0000020.jpg", size=(24, 16), seed=20)
    copy(root / MEL / "ISIC_0000020.jpg", root / NEV / "ISIC_0000021.jpg")
    make_image(root / NEV / "ISIC_0000022.jpg", size=(24, 16), seed=22)
    gt = pd.Series({"ISIC_0000020": "MEL", "ISIC_0000021": "NV"})

    manifest = dataset.build_manifest(dataset.scan(str(root)), gt)

    assert manifest["image_id"].tolist() == ["ISIC_0000022"]


# ---------------------------------------------------------------- split


def synthetic_manifest() -> pd.DataFrame:
    """Classes of 1, 2, 3, 7 and 40 ids; 10 melanoma and 2 nevus ids have two contents (rows) each."""
    rows = []
    for label, n in [("dermatofibroma", 1), ("vascular lesion", 2), ("actinic keratosis", 3), (NEV, 7), (MEL, 40)]:
        for i in range(n):
            iid = f"ISIC_{label[:3]}_{i:03d}"
            copies = 2 if (label == MEL and i < 10) or (label == NEV and i < 2) else 1
            for c in range(copies):
                rows.append({"image_id": iid, "uri": f"/x/{label}/{iid}-{c}.jpg", "label": label, "sha256": f"{iid}-{c}"})
    return pd.DataFrame(rows, columns=dataset.MANIFEST_COLUMNS)


def val_ids(df: pd.DataFrame) -> set[str]:
    return set(df.loc[df["split"] == "val", "image_id"])


def test_split_is_stratified_by_class_over_ids():
    manifest = synthetic_manifest()
    out = dataset.split(manifest, 0.2, seed=7)

    assert len(out) == len(manifest) and set(out["split"]) == {"train", "val"}
    ids = out.groupby("image_id").agg(label=("label", "first"), split=("split", "first"))
    for label, group in ids.groupby("label"):
        n, n_val = len(group), int((group["split"] == "val").sum())
        if n >= 2:
            assert 1 <= n_val <= n - 1, (label, n, n_val)
        else:
            assert n_val == 0, (label, n, n_val)  # a single image trains
        assert abs(n_val - n * 0.2) <= 1, (label, n, n_val)
    assert int((ids.loc[ids["label"] == MEL, "split"] == "val").sum()) == 8  # 40 * 0.2 exactly


def test_rows_sharing_an_image_id_never_straddle_train_and_val():
    for seed in range(20):
        out = dataset.split(synthetic_manifest(), 0.3, seed=seed)
        per_id = out.groupby("image_id")["split"].nunique()
        assert (per_id == 1).all(), f"seed {seed}: {list(per_id[per_id > 1].index)}"
        train_ids = set(out.loc[out["split"] == "train", "image_id"])
        assert not (train_ids & val_ids(out))


def test_split_is_seeded_and_independent_of_row_order():
    manifest = synthetic_manifest()
    a = dataset.split(manifest, 0.2, seed=1)
    b = dataset.split(manifest, 0.2, seed=1)
    shuffled = dataset.split(manifest.sample(frac=1, random_state=3).reset_index(drop=True), 0.2, seed=1)
    other = dataset.split(manifest, 0.2, seed=2)

    assert a["split"].tolist() == b["split"].tolist()
    assert val_ids(shuffled) == val_ids(a)
    assert val_ids(other) != val_ids(a)
    assert len(val_ids(other)) == len(val_ids(a))


def test_images_of_one_lesion_never_straddle_train_and_val():
    """Melanoma ids 0-19 are ten lesions of two images each; the other ids are their own group."""
    manifest = synthetic_manifest()
    lesions = pd.Series({f"ISIC_mel_{i:03d}": f"HAM_{i // 2:07d}" for i in range(20)})
    straddled_without = 0
    for seed in range(20):
        out = dataset.split(manifest, 0.3, seed=seed, lesions=lesions)
        lesion = out["image_id"].map(lesions)
        assert (out[lesion.notna()].groupby(lesion.dropna())["split"].nunique() == 1).all(), seed
        assert (out.groupby("image_id")["split"].nunique() == 1).all(), seed
        mel_val = out[(out["label"] == MEL) & (out["split"] == "val")]
        # stratified over groups: 10 lesions + 20 single ids = 30 melanoma groups, 30% of them in val
        assert mel_val["image_id"].map(lesions).fillna(mel_val["image_id"]).nunique() == 9
        plain = dataset.split(manifest, 0.3, seed=seed)
        straddled_without += int((plain.groupby(plain["image_id"].map(lesions).dropna())["split"].nunique() > 1).sum())
    assert straddled_without > 0  # by image id alone, lesions do straddle


def test_read_lesions_takes_a_metadata_csv_and_names_missing_columns(tmp_path):
    good = tmp_path / "meta.csv"
    good.write_text("lesion_id,image_id,dx\nHAM_1,ISIC_1,mel\nHAM_1,ISIC_2,mel\nHAM_2,ISIC_3,nv\n")
    assert dataset.read_lesions(str(good)).to_dict() == {"ISIC_1": "HAM_1", "ISIC_2": "HAM_1", "ISIC_3": "HAM_2"}
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nISIC_1,MEL\n")
    with pytest.raises(DatasetError, match=r"bad.csv: a lesion map needs image_id and lesion_id columns; image_id, lesion_id missing"):
        dataset.read_lesions(str(bad))


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_refuses_a_val_fraction_outside_zero_one(fraction):
    with pytest.raises(DatasetError, match="val_fraction must be between 0 and 1"):
        dataset.split(synthetic_manifest(), fraction, seed=0)


def test_make_split_writes_manifest_and_audit_that_read_back(crafted, tmp_path, ground_truth_csv):
    out = tmp_path / "work"
    manifest = dataset.make_split(str(crafted), str(out), 0.5, 3, str(ground_truth_csv))

    assert sorted(p.name for p in out.iterdir()) == ["audit.json", "manifest.parquet"]
    back = dataset.read_manifest(str(out))
    pd.testing.assert_frame_equal(back.reset_index(drop=True), manifest.reset_index(drop=True))
    report = json.loads((out / "audit.json").read_text())
    assert (report["files"], report["unique_images"], report["conflicting_groups"]) == (13, 9, 3)
    assert report["split_seed"] == 3 and report["val_fraction"] == 0.5


def test_read_manifest_of_a_dir_without_one_says_run_split(tmp_path):
    with pytest.raises(DatasetError, match=r"no manifest \(run `melanoma split` first\)"):
        dataset.read_manifest(str(tmp_path))


# ---------------------------------------------------------------- bad input: functions and the CLI


def _good(root: Path) -> None:
    make_image(root / MEL / "ISIC_0000001.jpg", size=(16, 16), seed=1)
    make_image(root / NEV / "ISIC_0000002.jpg", size=(16, 16), seed=2)


def missing(tmp: Path):
    return tmp / "no-such-dataset", StorageError, r"no-such-dataset: no such file or directory"


def empty_dir(tmp: Path):
    (tmp / "empty").mkdir()
    return tmp / "empty", DatasetError, r"empty: no files \(expected <root>/<class name>/<image file>\)"


def only_empty_class_folders(tmp: Path):
    for name in (MEL, NEV):
        (tmp / "hollow" / name).mkdir(parents=True)
    return tmp / "hollow", DatasetError, r"hollow: no files"


def text_file_among_images(tmp: Path):
    _good(tmp / "d")
    (tmp / "d" / NEV / "notes.txt").write_text("to do: relabel\n")
    return tmp / "d", DatasetError, r"nevus/notes\.txt: not an image file \(\.jpg, \.jpeg, \.png\)"


def jpg_that_is_not_an_image(tmp: Path):
    _good(tmp / "d")
    (tmp / "d" / MEL / "ISIC_0000009.jpg").write_bytes(b"<html>404 not found</html>\n")
    return tmp / "d", DatasetError, r"melanoma/ISIC_0000009\.jpg: not a readable image"


def empty_jpg(tmp: Path):
    _good(tmp / "d")
    (tmp / "d" / MEL / "ISIC_0000009.jpg").write_bytes(b"")
    return tmp / "d", DatasetError, r"melanoma/ISIC_0000009\.jpg: not a readable image"


def unknown_class_folder(tmp: Path):
    _good(tmp / "d")
    make_image(tmp / "d" / "melanomas" / "ISIC_0000003.jpg", size=(16, 16), seed=3)
    return tmp / "d", DatasetError, r"unknown class folder 'melanomas' \(expected one of actinic keratosis, "


def file_outside_class_folders(tmp: Path):
    _good(tmp / "d")
    make_image(tmp / "d" / "ISIC_0000003.jpg", size=(16, 16), seed=3)
    return tmp / "d", DatasetError, r"ISIC_0000003\.jpg: not in a class folder"


BAD_DATASETS = [missing, empty_dir, only_empty_class_folders, text_file_among_images, jpg_that_is_not_an_image,
                empty_jpg, unknown_class_folder, file_outside_class_folders]  # fmt: skip


@pytest.mark.parametrize("make_bad", BAD_DATASETS, ids=lambda f: f.__name__)
def test_scan_refuses_bad_datasets_with_one_line_naming_the_problem(tmp_path, make_bad):
    root, error, pattern = make_bad(tmp_path)

    with pytest.raises(error) as caught:
        dataset.scan(str(root))

    message = str(caught.value)
    assert "\n" not in message
    assert re.search(pattern, message), message


PROGRESS = re.compile(r"^\s*\w+:\s+\d+%\|")  # tqdm's "hash:  50%|█████ | 1/2 ..." refreshes


def error_lines(stderr: str) -> list[str]:
    """stderr without tqdm progress-bar refreshes (they are separated by carriage returns)."""
    return [s for s in re.split(r"[\r\n]+", stderr) if s.strip() and not PROGRESS.match(s)]


def files_below(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.mark.parametrize("make_bad", BAD_DATASETS, ids=lambda f: f.__name__)
def test_cli_audit_and_split_fail_with_exit_1_one_line_and_write_nothing(tmp_path, capsys, make_bad):
    root, _, pattern = make_bad(tmp_path)
    out = tmp_path / "work"

    assert cli.main(["audit", str(root)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("melanoma audit: error: "), captured.err
    assert re.search(pattern, lines[0]), lines[0]

    assert cli.main(["split", str(root), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    lines = error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("melanoma split: error: "), captured.err
    assert re.search(pattern, lines[0]), lines[0]
    assert files_below(out) == []


def test_split_that_fails_after_scanning_writes_nothing(tmp_path, capsys, crafted, ground_truth_csv):
    """Failures late in make_split (split parameters, nothing left after dropping conflicts) leave --out empty."""
    out = tmp_path / "work"
    assert cli.main(["split", str(crafted), "--out", str(out), "--val-fraction", "1.5"]) == 1
    assert error_lines(capsys.readouterr().err) == ["melanoma split: error: val_fraction must be between 0 and 1, got 1.5"]
    assert files_below(out) == []

    only_conflicts = tmp_path / "conflicts"
    make_image(only_conflicts / MEL / "ISIC_0000001.jpg", size=(16, 16), seed=1)
    copy(only_conflicts / MEL / "ISIC_0000001.jpg", only_conflicts / NEV / "ISIC_0000001.jpg")
    assert cli.main(["split", str(only_conflicts), "--out", str(out)]) == 1
    assert error_lines(capsys.readouterr().err) == ["melanoma split: error: no images left after dropping conflicting labels"]
    assert files_below(out) == []


def test_split_with_bad_ground_truth_writes_nothing(tmp_path, capsys, crafted):
    out = tmp_path / "work"
    bad = tmp_path / "gt.csv"
    bad.write_text("image,label\nISIC_0000001,MELANOMA\n")

    assert cli.main(["split", str(crafted), "--out", str(out), "--ground-truth", str(bad)]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"melanoma split: error: {bad}: unknown label 'MELANOMA'"), lines
    assert files_below(out) == []
    assert cli.main(["split", str(crafted), "--out", str(out), "--ground-truth", str(tmp_path / "nope.csv")]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "nope.csv: no such file" in lines[0], lines
    assert files_below(out) == []


def test_empty_ground_truth_csv_is_a_one_line_error(tmp_path, capsys, crafted):
    empty = tmp_path / "gt.csv"
    empty.write_text("")

    assert cli.main(["audit", str(crafted), "--ground-truth", str(empty)]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("melanoma audit: error: ") and "gt.csv" in lines[0], lines


def test_an_empty_class_folder_is_not_an_error_and_adds_no_rows(tmp_path, capsys):
    """Decided behaviour: an empty class folder contributes nothing (a dataset may lack a class); the other
    classes audit and split as without it. Only a dataset with no files at all is refused."""
    root = tmp_path / "d"
    for i in range(4):
        make_image(root / MEL / f"ISIC_000000{i}.jpg", size=(16, 16), seed=i)
        make_image(root / NEV / f"ISIC_100000{i}.jpg", size=(16, 16), seed=10 + i)
    (root / "dermatofibroma").mkdir()

    report = dataset.audit_uri(str(root))
    assert report["files"] == 8 and report["files_per_class"] == {MEL: 4, NEV: 4}

    out = tmp_path / "work"
    assert cli.main(["split", str(root), "--out", str(out), "--val-fraction", "0.25"]) == 0
    assert "manifest: 8 images (6 train, 2 val)" in capsys.readouterr().out
    manifest = dataset.read_manifest(str(out))
    assert set(manifest["label"]) == {MEL, NEV}


def test_cli_audit_json_prints_one_object_with_the_counts(crafted, capsys):
    assert cli.main(["audit", str(crafted), "--json"]) == 0
    out = capsys.readouterr().out.strip()
    report = json.loads(out)
    assert {k: report[k] for k in ("files", "unique_images", "duplicate_groups", "conflicting_groups")} == {
        "files": 13, "unique_images": 9, "duplicate_groups": 4, "conflicting_groups": 3,
    }  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["audit"],
        ["split", "somewhere"],  # --out is required
        ["split", "somewhere", "--out", "w", "--val-fraction", "a fifth"],
        ["split", "somewhere", "--out", "w", "--seed", "1.5"],
        ["augment", "w", "--target-per-class", "10", "--add-per-class", "5"],  # mutually exclusive
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    assert caught.value.code == 2
    assert "usage: melanoma" in capsys.readouterr().err


def test_cli_split_succeeds_and_prints_counts(crafted, tmp_path, capsys):
    out = tmp_path / "work"
    assert cli.main(["split", str(crafted), "--out", str(out), "--seed", "5", "--val-fraction", "0.5"]) == 0
    manifest = dataset.read_manifest(str(out))
    assert len(manifest) == 6
    n_val = int((manifest["split"] == "val").sum())
    assert f"manifest: 6 images ({6 - n_val} train, {n_val} val) -> {out}" in capsys.readouterr().out
    assert storage.exists(str(out / "audit.json"))
    assert np.isin(manifest["split"], ["train", "val"]).all()
