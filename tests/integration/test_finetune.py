"""The pretrained default recipe on real images: a small fine-tune under Ray Train lowers the loss, publishes a
model that scores; and the pipeline's work dir built from the real shared data holds no lesion, patient,
image or content on two sides of train / val / test."""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pandas as pd
import pytest

from melanoma import augment, dataset, ham10000, images, model, pipeline, registry, score, sources, train
from melanoma.config import settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mean_loss(m, rows: pd.DataFrame, size: int) -> float:
    pixels = np.stack([images.resize(images.decode(open(u, "rb").read(), 10**8, 1024), size) for u in rows["uri"]])
    probs = m.predict_on_batch(pixels.astype(np.float32))
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(rows)), rows["label_index"]], 1e-7, 1))))


@pytest.fixture(scope="module")
def tiny_work_dir(shared_data, tmp_path_factory) -> str:
    """48 real images (melanoma, nevus, pigmented benign keratosis: 16 each), split 2:1."""
    root = tmp_path_factory.mktemp("tiny")
    for folder in ("melanoma", "nevus", "pigmented benign keratosis"):
        (root / "data" / folder).mkdir(parents=True)
        for f in sorted((shared_data / "isic-9class" / "Train" / folder).glob("*.jpg"))[:16]:
            (root / "data" / folder / f.name).symlink_to(f.resolve())
    work = str(root / "work")
    dataset.make_split(str(root / "data"), work, 0.34, 42)
    return work


def test_one_epoch_of_fine_tuning_lowers_the_loss_and_the_model_scores(ray_client, tiny_work_dir, shared_data, tmp_path):
    s = settings(epochs=1, batch_size=8, workers=2, learning_rate=1e-3)
    assert s.arch == "default" and model.build(s.arch, 9, 64).name == "efficientnet_lite0"
    train_rows, _ = train.training_tables(tiny_work_dir)
    keras.utils.set_random_seed(s.seed)
    before = mean_loss(model.build(s.arch, 9, s.image_size), train_rows, s.image_size)
    card = train.train(s, tiny_work_dir, str(tmp_path / "models"))
    after = mean_loss(registry.load(str(tmp_path / "models")).model, train_rows, s.image_size)
    assert after < before, (before, after)
    assert card["recipe"]["arch"] == "default" and card["epochs_run"] == 1

    archive = tmp_path / "archive"
    archive.mkdir()
    for f in sorted((shared_data / "ham10000" / "images").glob("*.jpg"))[:6]:
        shutil.copy(f, archive / f.name)
    summary = score.score(settings(), str(tmp_path / "models"), str(archive), str(tmp_path / "scores"), "2026-11-25")
    assert summary["scored"] == 6 and summary["errors"] == 0


def test_the_pipeline_work_dir_has_no_leak(shared_data, tmp_path):
    work = str(tmp_path / "work")
    reports = pipeline.prepare(settings(), str(shared_data), work)
    manifest = dataset.read_manifest(work)
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert manifest["sha256"].is_unique and manifest["image_id"].is_unique
    # every group (patient, lesion or image) on one side only
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    # HAM10000's lesions on one side only, also across sources (9-class images that are HAM photos)
    lesion = pd.read_csv(shared_data / "ham10000" / ham10000.METADATA).set_index("image_id")["lesion_id"]
    known = manifest.assign(lesion=manifest["image_id"].map(lesion)).dropna(subset=["lesion"])
    assert (known.groupby("lesion")["split"].nunique() == 1).all()
    # patients (ISIC 2020) and lesions (BCN) of isic-extra on one side only
    extra = pd.read_csv(shared_data / "isic-extra" / "labels.csv", dtype=str).set_index("image_id")
    for column in ("patient_id", "lesion_id"):
        ids = manifest.assign(key=manifest["image_id"].map(extra[column])).dropna(subset=["key"])
        assert (ids.groupby("key")["split"].nunique() == 1).all(), column
    # augmented samples come from training images only
    augmented = augment.read_augmented(work)
    assert set(augmented["source_image_id"]) <= set(manifest.loc[manifest["split"] == "train", "image_id"])
    # HAM-test is the same held-out set as before: 830 images, 112 melanomas
    ham_test = manifest[(manifest["source"] == "ham10000") & (manifest["split"] == "test")]
    assert (len(ham_test), int(ham_test["melanoma"].sum())) == (830, 112)
    test_sources = set(manifest.loc[manifest["split"] == "test", "source"])
    assert {"ham10000", "isic2020", "isic2019-84px"} <= test_sources
    # a rerun skips every step
    again = pipeline.prepare(settings(), str(shared_data), work)
    assert all(r.get("skipped") for r in again.values())
    assert sources.read_sources(work).keys() == reports.keys()
