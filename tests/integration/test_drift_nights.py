"""The drift watch end to end, on real images through the real pipeline (SeaweedFS, a local Ray cluster): a model
published by train.publish_evaluated with its drift reference measured on HAM10000 validation images, then five
nights scored from S3 into S3. A normal night of other HAM10000 lesions stays quiet; the same images made darker, blurred or colour-cast, and
a night of ISIC 2020 images, raise the alert with a reason that names what moved. The report shows the alert, and
`melanoma query --runs` lists the nights with their figures."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from melanoma import cli, drift, ham10000, registry, report, score, storage, train
from melanoma import model as architectures
from melanoma.config import CLASS_NAMES, settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VAL_IMAGES, NIGHT_IMAGES = 400, 200
# What is compared does not depend on how well the model was trained: an untrained from-scratch network with a
# random output layer, scaled up so that images get different risks, is published in seconds instead of training
# one on these shared cores.
ARCH, KERNEL_SCALE = "residual-sep-v2", 0.3


def _untrained():
    import keras

    keras.utils.set_random_seed(7)
    net = architectures.build(ARCH, len(CLASS_NAMES), settings().image_size)
    dense = net.get_layer("probabilities")
    dense.kernel.assign(np.random.default_rng(7).normal(0, KERNEL_SCALE, dense.kernel.shape).astype("float32"))
    return net


def _cast(image: Image.Image) -> Image.Image:
    """A cold colour cast: less red, more blue."""
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) * [0.85, 1.0, 1.2], 0, 255).astype(np.uint8))


# night -> (how its images are changed, the start of the reason expected; None: a quiet night)
NIGHTS = {
    "2026-12-01": (None, None),
    "2026-12-02": (lambda im: ImageEnhance.Brightness(im).enhance(0.7), "brightness fell: mean "),
    "2026-12-03": (lambda im: im.filter(ImageFilter.GaussianBlur(1.5)), "sharpness fell: mean "),
    "2026-12-04": (_cast, "blue share of the colour rose: mean "),
    "2026-12-05": ("isic2020", "image size rose: mean 256 px vs 173 px in validation"),
}


def _write_night(folder: Path, files: list[Path], change) -> None:
    folder.mkdir(parents=True)
    for f in files:
        if change is None:
            (folder / f.name).write_bytes(f.read_bytes())
        else:
            change(Image.open(f).convert("RGB")).save(folder / f.name, format="JPEG", quality=90)


@pytest.fixture(scope="module")
def nights(s3, ray_cluster, small_work_dir, shared_data, tmp_path_factory):
    """(scores uri, models uri, model card, {night: summary}): a model published with a reference measured on
    HAM10000 validation lesions, and the five nights scored with it."""
    import ray

    bucket = s3.make_bucket(f"drift-{uuid.uuid4().hex[:8]}")
    meta = pd.read_csv(shared_data / "ham10000" / ham10000.METADATA).drop_duplicates("lesion_id")
    meta = meta.sample(VAL_IMAGES + NIGHT_IMAGES, random_state=7)  # one image per lesion: no lesion on both sides
    val, night = meta.iloc[:VAL_IMAGES], meta.iloc[VAL_IMAGES:]
    val_rows = pd.DataFrame({
        "image_id": val["image_id"],
        "uri": [str(shared_data / "ham10000" / "images" / f"{i}.jpg") for i in val["image_id"]],
        "label_index": [CLASS_NAMES.index(ham10000.HAM_TO_CLASS[dx]) for dx in val["dx"]],
    }).reset_index(drop=True)  # fmt: skip
    models = f"{bucket}/models"
    card = train.publish_evaluated(_untrained(), settings(), small_work_dir, val_rows, models, {"arch": ARCH})

    root = tmp_path_factory.mktemp("drift-nights")
    ham_files = [shared_data / "ham10000" / "images" / f"{i}.jpg" for i in night["image_id"]]
    labels = pd.read_csv(shared_data / "isic-extra" / "labels.csv")
    isic2020 = labels[labels["source"] == "isic2020"].sample(NIGHT_IMAGES, random_state=7)["image_id"]
    isic_files = [shared_data / "isic-extra" / "images" / f"{i}.jpg" for i in isic2020]
    for run_date, (change, _) in NIGHTS.items():
        if change == "isic2020":
            _write_night(root / run_date, isic_files, None)
        else:
            _write_night(root / run_date, ham_files, change)
    s3.upload_dir(root, f"{bucket}/archive")

    scores = f"{bucket}/scores"
    s = settings(actors=1)
    ray.init(address=ray_cluster.address)
    try:
        summaries = {d: score.score(s, models, f"{bucket}/archive/{d}", scores, d) for d in NIGHTS}
    finally:
        ray.shutdown()
    for d, summary in summaries.items():  # the figures, for the record (pytest -s)
        figures = summary["drift"]
        psi = {name: f["psi"] for name, f in figures["features"].items()}
        print(d, figures["alert"], psi, figures["flagged_share"]["psi"], figures["class_mix"]["psi"], figures["reasons"])
    return scores, models, card, summaries


def test_the_reference_is_published_with_the_model(nights):
    _, models, card, _ = nights
    version_dir = storage.join(models, card["version"])
    reference = drift.read_reference(version_dir, registry.read_card(version_dir))
    assert reference["images"] == VAL_IMAGES
    assert set(reference["features"]) == set(drift.FEATURES)
    assert reference["features"]["size"]["edges"] == [pytest.approx(np.sqrt(200 * 150))]  # every HAM image 200x150
    assert sum(reference["classes"].values()) == VAL_IMAGES


def test_a_normal_night_stays_quiet(nights):
    scores, _, card, summaries = nights
    quiet = summaries["2026-12-01"]["drift"]
    assert quiet["alert"] is False and quiet["reasons"] == []
    assert quiet["reference"] == card["version"] and quiet["images"] == NIGHT_IMAGES
    assert all(f["psi"] < 0.25 for f in quiet["features"].values())
    # the statistics are columns of the output rows
    fs, path = storage.pyarrow_fs(storage.join(scores, "run_date=2026-12-01"))
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=list(drift.STAT_COLUMNS)).to_pandas()
    assert (table["image_width"] == 200).all() and (table["image_height"] == 150).all()
    assert table["mean_red"].between(0, 1).all() and (table["sharpness"] > 0).all()


@pytest.mark.parametrize("run_date", [d for d, (_, reason) in NIGHTS.items() if reason])
def test_a_shifted_night_raises_the_alert_naming_what_moved(nights, run_date):
    summaries = nights[3]
    figures = summaries[run_date]["drift"]
    assert figures["alert"] is True
    assert any(r.startswith(NIGHTS[run_date][1]) for r in figures["reasons"]), figures["reasons"]


def test_the_report_shows_the_alert_and_the_panel(nights, tmp_path):
    scores = nights[0]
    pages = {}
    for run_date in ("2026-12-01", "2026-12-02"):
        out = tmp_path / f"{run_date}.html"
        report.morning_report(scores, run_date, str(out), heatmaps=0, top=5)
        pages[run_date] = out.read_text()
    assert 'id="drift-alert"' not in pages["2026-12-01"] and "Nothing moved: no drift alert." in pages["2026-12-01"]
    loud = pages["2026-12-02"]
    assert 'id="drift-alert"' in loud and "<li>brightness fell: mean " in loud
    assert loud.index('id="drift-alert"') < loud.index('id="flagged"')  # on top, before the lesions
    assert 'id="drift-panel" src="data:image/png;base64,' in loud


def test_query_lists_the_nights_with_their_drift(nights, capsys):
    scores = nights[0]
    assert cli.main(["query", scores, "--runs", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_date"] for r in rows] == list(NIGHTS)
    assert [r["drift_alert"] for r in rows] == [False, True, True, True, True]
    assert rows[1]["drift_reasons"].startswith("brightness fell") and rows[1]["psi_brightness"] >= 0.25
    assert rows[0]["drift_reasons"] == "" and rows[0]["psi_size"] == 0
