"""Training on a real local Ray cluster: 2 CPU workers under MultiWorkerMirroredStrategy, on a small subset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from melanoma import registry, storage, train
from melanoma.config import CLASS_NAMES, settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_workers_train_and_publish(trained_model, small_work_dir):
    card = registry.read_card(trained_model)
    history = card["history"]
    assert card["workers"] == 2
    assert len(history) == 2
    assert history[-1]["train_loss"] < history[0]["train_loss"], history

    loaded = registry.load(trained_model)
    images = np.random.default_rng(0).integers(0, 255, (3, 180, 180, 3)).astype(np.float32)
    probs = loaded.model.predict_on_batch(images)
    assert probs.shape == (3, len(CLASS_NAMES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_model_card_contents(trained_model, small_work_dir):
    card = registry.read_card(trained_model)
    for key in ("version", "arch", "class_names", "input_size", "training_manifest_sha256", "split_seed",
                "temperature", "alert_threshold", "libraries", "created_at", "model_sha256", "metrics", "calibration"):
        assert key in card, key
    assert card["class_names"] == list(CLASS_NAMES)
    assert card["input_size"] == [settings().image_size, settings().image_size, 3]
    m = card["metrics"]
    for key in ("accuracy", "balanced_accuracy", "per_class", "confusion_matrix", "melanoma_auc"):
        assert key in m, key
    assert np.array(m["confusion_matrix"]).sum() == card["val_images"]
    c = card["calibration"]
    assert {"ece_before", "ece_after", "temperature", "alert_threshold", "held_out", "at_threshold"} <= set(c)
    assert c["at_threshold"]["sensitivity"] >= 0.9
    assert 0 < card["alert_threshold"] <= 1
    manifest_bytes = storage.read_bytes(storage.join(small_work_dir, "manifest.parquet"))
    import hashlib

    assert card["training_manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert set(card["libraries"]) >= {"tensorflow", "keras", "ray"}


def test_resume_from_checkpoint(ray_client, small_work_dir, tmp_path):
    """A run stopped after one epoch and rerun under the same name continues at epoch 2, not from scratch."""
    s = settings(epochs=1, batch_size=16, workers=2)
    first = train.train(s, small_work_dir, str(tmp_path / "models"), run_name="resume-me")
    second = train.train(settings(epochs=2, batch_size=16, workers=2), small_work_dir, str(tmp_path / "models"), run_name="resume-me")
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]  # epoch 1 was not trained again
    assert second["version"] != first["version"]


def test_tampered_model_is_refused(trained_model, tmp_path):
    version_dir = registry.resolve(trained_model)
    model_file = storage.join(version_dir, registry.MODEL_FILE)
    data = storage.read_bytes(model_file)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / registry.CARD_FILE).write_bytes(storage.read_bytes(storage.join(version_dir, registry.CARD_FILE)))
    (copy / registry.MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(registry.ModelError, match="checksum mismatch"):
        registry.load(str(copy))
    card = json.loads((copy / registry.CARD_FILE).read_text())
    assert card["model_sha256"] != ""
