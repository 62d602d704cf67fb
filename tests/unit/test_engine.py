"""The TF-Lite export against the Keras model it comes from, and a damaged export refused on load."""

from __future__ import annotations

import numpy as np
import pytest

from melanoma import engine, model, registry
from melanoma.config import CLASS_NAMES

SIZE = 64


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> str:
    """A pretrained default-architecture model (untrained head) published with its TF-Lite export."""
    net = model.build("default", len(CLASS_NAMES), SIZE)
    models = tmp_path_factory.mktemp("models")
    path = models / "model.keras"
    net.save(path)
    card = {"version": "v1", "class_names": list(CLASS_NAMES), "input_size": [SIZE, SIZE, 3], "temperature": 1.0,
            "alert_threshold": 0.5}  # fmt: skip
    registry.publish(str(models), str(path), card, {engine.TFLITE_FILE: engine.export_tflite(net, SIZE)})
    return str(models / "v1")


def photos(n: int) -> np.ndarray:
    """Real photographs (scikit-image's), cropped and resized to the model's input: 0-255 floats."""
    from skimage import data, transform

    pictures = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    out = [transform.resize(pictures[i % 4][i : i + 300, i : i + 300], (SIZE, SIZE), preserve_range=True) for i in range(n)]
    return np.stack(out).astype(np.float32)


def test_the_export_gives_the_keras_probabilities(published):
    keras_engine, card, _ = engine.load(published, "keras", threads=2)
    lite, lite_card, _ = engine.load(published, "auto", threads=2)
    batch = photos(12)

    assert (keras_engine.name, lite.name) == ("keras", "tflite") and lite_card == card
    expected, got = keras_engine.predict(batch), lite.predict(batch)
    assert got.shape == (12, len(CLASS_NAMES))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(lite.predict(batch[:5]), expected[:5], atol=1e-5)  # another batch length


def test_check_picks_keras_for_gpu_actors_and_without_an_export(published, tmp_path):
    assert engine.check(published, "auto", gpu=True)[2] == "keras"
    assert engine.check(published, "auto")[2] == "tflite"
    net = model.build("residual-sep", len(CLASS_NAMES), SIZE)
    net.save(tmp_path / "m.keras")
    registry.publish(str(tmp_path / "models"), str(tmp_path / "m.keras"), registry.read_card(published) | {"files": {}})
    assert engine.check(str(tmp_path / "models"), "auto")[2] == "keras"
    with pytest.raises(registry.ModelError, match="published without a TF-Lite export"):
        engine.check(str(tmp_path / "models"), "tflite")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


def test_an_export_with_one_byte_flipped_is_refused_with_one_line(published, tmp_path):
    import shutil

    copy = tmp_path / "v1"
    shutil.copytree(published, copy)
    data = bytearray((copy / engine.TFLITE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / engine.TFLITE_FILE).write_bytes(bytes(data))
    for call in (lambda: engine.check(str(copy), "auto"), lambda: engine.load(str(copy), "auto", threads=1)):
        with pytest.raises(registry.ModelError) as exc:
            call()
        assert engine.TFLITE_FILE in _one_line(exc) and "checksum mismatch" in _one_line(exc)


def test_a_truncated_export_published_with_its_own_checksum_cannot_be_loaded(published, tmp_path):
    card = registry.read_card(published)
    flatbuffer = (registry.read_extra(published, card, engine.TFLITE_FILE))[:5000]
    models = tmp_path / "models"
    registry.publish(str(models), f"{published}/{registry.MODEL_FILE}", card | {"files": {}}, {engine.TFLITE_FILE: flatbuffer})
    with pytest.raises(registry.ModelError) as exc:
        engine.load(str(models), "auto", threads=1)
    assert engine.TFLITE_FILE in _one_line(exc) and "cannot be loaded" in _one_line(exc)


def test_an_unknown_engine_is_named(published):
    with pytest.raises(registry.ModelError, match="engine 'onnx' is not one of auto, keras, tflite"):
        engine.load(published, "onnx", threads=1)
