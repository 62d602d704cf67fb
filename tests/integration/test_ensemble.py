"""Ensembles of published models: averaged, recalibrated, published, and refused when a member saw the
validation images or does not fit with the others."""

from __future__ import annotations

import numpy as np
import pytest

from melanoma import cli, dataset, ensemble, gradcam, images, registry, storage, train
from melanoma.config import settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _publish_variant(model_dir: str, target_dir: str, version: str, card_changes: dict | None = None) -> str:
    """A second real member: the trained model with its weights nudged, published under its own version."""
    loaded = registry.load(model_dir)
    rng = np.random.default_rng(1)
    for w in loaded.model.trainable_weights:  # not the batch-norm statistics: a nudged variance can turn negative
        w.assign(w.numpy() + rng.normal(0, 0.05, w.shape).astype(w.dtype))
    path = f"{target_dir}/variant.keras"
    loaded.model.save(path)
    card = loaded.card | {"version": version} | (card_changes or {})
    return registry.publish(f"{target_dir}/models", path, card)


@pytest.fixture(scope="module")
def second_member(trained_model, tmp_path_factory) -> str:
    return _publish_variant(trained_model, str(tmp_path_factory.mktemp("variant")), "20260101-000000-variant")


def _val_pictures(work_dir: str, n: int) -> np.ndarray:
    _, val = train.training_tables(work_dir)
    s = settings()
    return np.stack([images.resize(images.decode(storage.read_bytes(u), s.max_image_pixels, s.max_decoded_side), s.image_size)
                     for u in val["uri"][:n]]).astype(np.float32)


def test_ensemble_is_the_mean_of_its_members_and_is_calibrated(trained_model, second_member, small_work_dir, tmp_path):
    out = str(tmp_path / "ensembles")
    card = ensemble.combine(settings(), [trained_model, second_member], small_work_dir, out)

    loaded = registry.load(out)  # safe mode, checksum, classes
    a, b = registry.load(trained_model).model, registry.load(second_member).model
    x = _val_pictures(small_work_dir, 6)
    mean = (a.predict_on_batch(x) + b.predict_on_batch(x)) / 2
    np.testing.assert_allclose(loaded.model.predict_on_batch(x), mean, atol=1e-5)
    assert np.abs(a.predict_on_batch(x) - b.predict_on_batch(x)).max() > 1e-3  # the members really differ

    assert card["arch"] == "ensemble"
    assert [m["version"] for m in card["members"]] == [registry.read_card(trained_model)["version"], "20260101-000000-variant"]
    _, val = train.training_tables(small_work_dir)
    assert card["val_images"] == len(val)
    assert card["calibration"]["at_threshold"]["sensitivity"] >= 0.9
    assert card["temperature"] > 0

    heat = gradcam.grad_cam(loaded)(x[0].astype(np.uint8))
    assert heat.shape == (settings().image_size, settings().image_size)
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


@pytest.mark.parametrize("renamed", [False, True], ids=["same ids", "copies under other ids"])
def test_members_that_trained_on_the_validation_split_are_refused(trained_model, second_member, small_work_dir, tmp_path, renamed):
    """Calibrating on images a member trained on would overstate the ensemble: the training split as validation."""
    manifest = dataset.read_manifest(small_work_dir)
    swapped = manifest.assign(split=np.where(manifest["split"] == "train", "val", "train"))
    if renamed:  # the same contents (sha256) under ids no member has seen
        swapped["image_id"] = "COPY_" + swapped["image_id"]
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    swapped.to_parquet(leaky / dataset.MANIFEST)
    out = tmp_path / "ensembles"
    with pytest.raises(dataset.DatasetError, match=r"trained on \d+ of the \d+ validation images of .*leaky"):
        ensemble.combine(settings(), [trained_model, second_member], str(leaky), str(out))
    assert not (out / registry.LATEST).exists()


def test_mismatched_or_single_members_are_one_line_errors(trained_model, tmp_path, capsys, small_work_dir):
    other_size = _publish_variant(trained_model, str(tmp_path), "20260101-000000-other-size", {"input_size": [180, 180, 3]})
    code = cli.main(["ensemble", trained_model, other_size, "--data", small_work_dir, "--model-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "input size [180, 180, 3] does not match" in err[0] and other_size in err[0], err

    code = cli.main(["ensemble", trained_model, "--data", small_work_dir, "--model-dir", str(tmp_path / "out")])
    assert code == 1
    assert "an ensemble needs at least two models, got 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
