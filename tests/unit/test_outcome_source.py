"""The outcome store as a labelled source (sources.add_outcomes), on generated images scored on three nights:
images copied from where they were scored (a tar member too), content already in the work dir or changed since
scoring dropped, every image on the most held-out side of its nights and its patient, nights never moved."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from helpers import make_image
from melanoma import dataset, layout, outcomes, pipeline, registry, sources, train
from melanoma.config import CLASS_NAMES, MELANOMA, settings, snake_case

SEED, VAL, TEST = 42, 0.3, 0.3


def nights_one_per_side() -> dict[str, str]:
    """The first date of each side (train, val, test) from 2026-10-01 on."""
    found: dict[str, str] = {}
    day = date(2026, 10, 1)
    while len(found) < 3:
        found.setdefault(sources.night_side(day.isoformat(), VAL, TEST, SEED), day.isoformat())
        day += timedelta(days=1)
    return found


def scores_row(uri: str, data: bytes) -> dict:
    return {
        "image_id": uri.rsplit("/", 1)[-1].rsplit(".", 1)[0], "image_uri": uri, "sha256": hashlib.sha256(data).hexdigest(),
        "melanoma_risk": 0.5, "flagged": True, "predicted_class": MELANOMA,
        **{f"p_{snake_case(c)}": 1.0 if c == MELANOMA else 0.0 for c in CLASS_NAMES},
        "model_version": "v1", "scored_at": datetime(2026, 11, 1, tzinfo=timezone.utc), "error": None,
    }  # fmt: skip


def write_scores(root: Path, nights: dict[str, list[tuple[str, bytes]]]) -> str:
    for night, rows in nights.items():
        (root / f"run_date={night}").mkdir(parents=True)
        table = pa.Table.from_pylist([scores_row(u, d) for u, d in rows], schema=layout.output_schema(list(CLASS_NAMES)))
        pq.write_table(table, root / f"run_date={night}" / "part-0.parquet")
    return str(root)


def test_confirmed_images_join_the_work_dir_split_by_night_and_patient(tmp_path):
    side = nights_one_per_side()
    train_night, val_night, test_night = side["train"], side["val"], side["test"]
    # a work dir of 8 generated images
    for i, label in enumerate(["melanoma", "nevus"] * 4):
        make_image(tmp_path / "nine" / label / f"ISIC_800000{i}.jpg", seed=90 + i)
    work = tmp_path / "work"
    dataset.make_split(str(tmp_path / "nine"), str(work), 0.5, SEED)
    # the archive: i0..i7, i2 a copy of a work dir image, i6 inside a tar shard
    archive = tmp_path / "archive"
    files = [make_image(archive / f"i{n}.jpg", seed=n) for n in range(8)]
    shutil.copyfile(tmp_path / "nine" / "nevus" / "ISIC_8000001.jpg", files[2])
    with tarfile.open(archive / "shard.tar", "w") as tar:
        tar.add(files[6], arcname="lesions/i6.jpg")
    uri = {n: str(f) for n, f in enumerate(files)} | {6: f"{archive}/shard.tar#lesions/i6.jpg"}
    content = {n: f.read_bytes() for n, f in enumerate(files)}
    scores = write_scores(tmp_path / "scores", {
        train_night: [(uri[n], content[n]) for n in (0, 1, 2, 3)],
        val_night: [(uri[n], content[n]) for n in (4, 5, 6)],
        test_night: [(uri[n], content[n]) for n in (7, 0)],  # i0 scored again
    })  # fmt: skip
    files[3].write_bytes(content[3] + b"changed")  # i3 changed since it was scored
    store = str(tmp_path / "store")
    csv = tmp_path / "outcomes.csv"
    csv.write_text("image_id,diagnosis,melanoma,confirmed_on,patient_id\n" + "".join(
        f"i{n},{d},{m},2026-11-20,{p}\n"
        for n, d, m, p in [(0, "melanoma", "", ""), (1, "", "no", "P1"), (2, "nevus", "", ""), (3, "nevus", "", ""),
                           (5, "nevus", "", "P1"), (6, "", "yes", ""), (7, "dermatofibroma", "", "")]
    ))  # fmt: skip
    outcomes.add(str(csv), store)

    report = sources.add_outcomes(str(work), store, scores, VAL, TEST, SEED)

    assert report["nights"] == {train_night: "train", val_night: "val", test_night: "test"}
    assert report["groups_touching_work_dir_dropped"] == 1 and report["unreadable_dropped"] == 1  # i2, i3
    manifest = dataset.read_manifest(str(work))
    added = manifest[manifest["source"] == sources.OUTCOMES].set_index("image_id")
    assert dict(added["split"]) == {
        "i0": "test",  # scored on a train night and on a test night
        "i1": "val", "i5": "val",  # patient P1: a train night and a val night
        "i6": "val", "i7": "test",
    }  # fmt: skip
    assert dict(added["label"].fillna("-")) == {"i0": MELANOMA, "i1": "-", "i5": "nevus", "i6": MELANOMA, "i7": "dermatofibroma"}
    assert dict(added["melanoma"]) == {"i0": 1, "i1": 0, "i5": 0, "i6": 1, "i7": 0}
    for image_id, row in added.iterrows():
        copy = Path(row["uri"])
        assert copy.parent == work / sources.OUTCOMES and hashlib.sha256(copy.read_bytes()).hexdigest() == row["sha256"]
    assert added.loc["i6", "sha256"] == hashlib.sha256(content[6]).hexdigest()  # read from the tar member
    assert sources.read_sources(str(work))[sources.OUTCOMES]["nights"] == report["nights"]

    # nothing new: nothing written; a new outcome later: only it is added, and no night moves
    before = (work / dataset.MANIFEST).read_bytes()
    again = sources.add_outcomes(str(work), store, scores, 0.0, 0.0, SEED)
    assert (work / dataset.MANIFEST).read_bytes() == before and again["per_split"] == {}
    csv.write_text("image_id,melanoma,confirmed_on\ni4,no,2026-11-25\n")
    outcomes.add(str(csv), store)
    later = sources.add_outcomes(str(work), store, scores, 0.0, 0.0, SEED)
    assert later["nights"] == report["nights"] and later["per_split"] == {"val": {sources.OUTCOMES: 1}}
    nothing = sources.add_outcomes(str(work), str(tmp_path / "no-store"), scores, VAL, TEST, SEED)
    assert nothing["rows"] == 0 and nothing["per_split"] == {}


def data_root(root: Path) -> Path:
    """A data root as `melanoma pipeline` reads it, of generated images: 9-class folders, ground truth,
    HAM10000 and isic-extra, four images each."""
    for i, label in enumerate(["melanoma", "nevus"] * 4):
        make_image(root / "isic-9class" / "Train" / label / f"ISIC_900000{i}.jpg", seed=300 + i)
    (root / "labels").mkdir()
    (root / "labels" / "isic2019_training_ground_truth.csv").write_text("image,label\nISIC_9000000,MEL\n")
    ham = ["lesion_id,image_id,dx"] + [f"HAM_{i},ISIC_910000{i},{'mel' if i % 2 else 'nv'}" for i in range(4)]
    (root / "ham10000").mkdir()
    (root / "ham10000" / "HAM10000_metadata.csv").write_text("\n".join(ham) + "\n")
    extra = ["image_id,label,melanoma,lesion_id,patient_id"] + [f"ISIC_920000{i},nevus,0,,P{i}" for i in range(4)]
    (root / "isic-extra").mkdir()
    (root / "isic-extra" / "labels.csv").write_text("\n".join(extra) + "\n")
    for i in range(4):
        make_image(root / "ham10000" / "images" / f"ISIC_910000{i}.jpg", seed=400 + i)
        make_image(root / "isic-extra" / "images" / f"ISIC_920000{i}.jpg", seed=500 + i)
    return root


def test_the_pipeline_adds_new_outcomes_on_every_run_and_trains_a_new_model_for_them(tmp_path):
    root = data_root(tmp_path / "data")
    night = nights_one_per_side()["train"]
    files = [make_image(tmp_path / "archive" / f"o{n}.jpg", seed=600 + n) for n in range(3)]
    scores = write_scores(tmp_path / "scores", {night: [(str(f), f.read_bytes()) for f in files]})
    store, csv = str(tmp_path / "store"), tmp_path / "outcomes.csv"
    csv.write_text("image_id,melanoma,confirmed_on\no0,yes,2026-11-20\no1,no,2026-11-20\n")
    outcomes.add(str(csv), store)
    work, models = str(tmp_path / "work"), str(tmp_path / "models")
    s = settings(seed=SEED)

    done = pipeline.prepare(s, str(root), work, store, scores)
    assert list(done) == ["ham10000", "isic-extra", sources.OUTCOMES]
    assert done[sources.OUTCOMES]["per_split"] == {"train": {sources.OUTCOMES: 2}}

    # a model published from this work dir under the run name with the manifest's digest is found, not retrained
    digest = hashlib.sha256(Path(work, dataset.MANIFEST).read_bytes())
    run_name = f"{train.run_name_for(s, work)}-{digest.hexdigest()[:8]}"
    (tmp_path / "model.keras").write_bytes(b"not trained here")
    card = {"version": "v1", "run_name": run_name, "class_names": list(CLASS_NAMES), "temperature": 1.0, "alert_threshold": 0.5}
    registry.publish(models, str(tmp_path / "model.keras"), card)
    assert pipeline.run(s, str(root), work, models, store, scores)["version"] == "v1"

    # one more outcome: added on the next run, and the manifest (so the run name) changes
    csv.write_text("image_id,melanoma,confirmed_on\no2,no,2026-11-21\n")
    outcomes.add(str(csv), store)
    before = Path(work, dataset.MANIFEST).read_bytes()
    assert pipeline.prepare(s, str(root), work, store, scores)[sources.OUTCOMES]["per_split"] == {"train": {sources.OUTCOMES: 1}}
    assert Path(work, dataset.MANIFEST).read_bytes() != before
