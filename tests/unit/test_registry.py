"""melanoma.registry with real (tiny) Keras models: publish/load round trip, the `latest` pointer, and every
way an artifact can be unusable, each refused with a one-line ModelError."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from melanoma import registry, storage
from melanoma.config import CLASS_NAMES
from melanoma.registry import ModelError

keras = pytest.importorskip("keras")


def tiny_model(seed: int, lambda_layer: bool = False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((8, 8, 3))]
    if lambda_layer:
        layers.append(keras.layers.Lambda(lambda x: x * 2.0))
    layers += [keras.layers.Flatten(), keras.layers.Dense(len(CLASS_NAMES), activation="softmax")]
    return keras.Sequential(layers)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """Two different good models, one with a Lambda layer, and a truncated copy of the first."""
    root = tmp_path_factory.mktemp("keras")
    files = {}
    for name, seed, lam in (("a", 1, False), ("b", 2, False), ("lambda", 3, True)):
        files[name] = root / f"{name}.keras"
        tiny_model(seed, lam).save(files[name])
    data = files["a"].read_bytes()
    files["truncated"] = root / "truncated.keras"
    files["truncated"].write_bytes(data[: len(data) // 2])
    return files


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).random((5, 8, 8, 3)).astype("float32")


def card(version: str, **changes) -> dict:
    return {"version": version, "class_names": list(CLASS_NAMES), "temperature": 1.3, "alert_threshold": 0.25} | changes


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_line(exc: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


# ---------------------------------------------------------------- publish / load


def test_publish_then_load_predicts_identically(tmp_path, model_files, batch):
    models = tmp_path / "models"
    target = registry.publish(str(models), str(model_files["a"]), card("v1"))

    assert target == str(models / "v1")
    assert sorted(p.name for p in (models / "v1").iterdir()) == sorted([registry.CARD_FILE, registry.MODEL_FILE])
    assert sha256(models / "v1" / registry.MODEL_FILE) == sha256(model_files["a"])
    written = json.loads((models / "v1" / registry.CARD_FILE).read_text())
    assert written == card("v1") | {"model_file": registry.MODEL_FILE, "model_sha256": sha256(model_files["a"]), "files": {}}
    assert (models / registry.LATEST).read_text() == "v1"

    loaded = registry.load(str(models))

    assert loaded.uri == str(models / "v1")
    assert loaded.class_names == list(CLASS_NAMES)
    expected = keras.models.load_model(model_files["a"], compile=False).predict(batch, verbose=0)
    np.testing.assert_array_equal(loaded.model.predict(batch, verbose=0), expected)


def test_the_first_publish_becomes_latest_and_a_later_one_waits_for_a_promotion(tmp_path, model_files, batch):
    models = tmp_path / "models"
    registry.publish(str(models), str(model_files["a"]), card("v1"))
    registry.publish(str(models), str(model_files["b"]), card("v2"))

    assert (models / registry.LATEST).read_text() == "v1"
    assert registry.versions(str(models)) == ["v1", "v2"]
    assert registry.resolve(str(models)) == str(models / "v1")
    current, waiting = registry.load(str(models)), registry.load(str(models / "v2"))
    assert current.card["version"] == "v1" and waiting.card["version"] == "v2"
    assert waiting.card["model_sha256"] == sha256(model_files["b"])
    assert not np.array_equal(waiting.model.predict(batch, verbose=0), current.model.predict(batch, verbose=0))


def test_extra_files_are_published_with_their_checksums_and_verified_on_read(tmp_path, model_files):
    models = tmp_path / "models"
    target = registry.publish(str(models), str(model_files["a"]), card("v1"), {"engine.bin": b"exported bytes"})
    written = registry.read_card(target)

    assert registry.read_extra(target, written, "engine.bin") == b"exported bytes"
    assert registry.read_extra(target, written, "absent.bin") is None
    (models / "v1" / "engine.bin").write_bytes(b"exported bytez")
    with pytest.raises(registry.ModelError) as exc:
        registry.read_extra(target, written, "engine.bin")
    assert_one_line(exc, "engine.bin", "checksum mismatch")
    (models / "v1" / "engine.bin").unlink()
    with pytest.raises(registry.ModelError) as exc:
        registry.read_extra(target, written, "engine.bin")
    assert_one_line(exc, "engine.bin", "missing")


def test_set_latest_points_back_at_an_older_version_and_refuses_an_unknown_one(tmp_path, model_files):
    models = tmp_path / "models"
    registry.publish(str(models), str(model_files["a"]), card("v1"))
    registry.publish(str(models), str(model_files["b"]), card("v2"))

    registry.set_latest(str(models), "v1")
    assert registry.resolve(str(models)) == str(models / "v1")
    with pytest.raises(registry.ModelError) as exc:
        registry.set_latest(str(models), "v9")
    assert_one_line(exc, "v9", "no such published version")
    assert registry.resolve(str(models)) == str(models / "v1")


def test_publishing_an_existing_version_fails_and_leaves_everything_as_it_was(tmp_path, model_files):
    models = tmp_path / "models"
    registry.publish(str(models), str(model_files["a"]), card("v1"))
    registry.publish(str(models), str(model_files["b"]), card("v2"))
    before = {p.relative_to(models).as_posix(): sha256(p) for p in models.rglob("*") if p.is_file()}

    with pytest.raises(ModelError) as caught:
        registry.publish(str(models), str(model_files["b"]), card("v1"))

    assert_one_line(caught, str(models / "v1"), "version already exists")
    assert (models / registry.LATEST).read_text() == "v1"
    assert {p.relative_to(models).as_posix(): sha256(p) for p in models.rglob("*") if p.is_file()} == before


def test_latest_is_set_only_after_the_card_is_written(tmp_path, model_files):
    """A first publish whose card cannot be written (not JSON-serialisable) must not point `latest` at it."""
    models = tmp_path / "models"

    with pytest.raises(TypeError):
        registry.publish(str(models), str(model_files["a"]), card("v1", trained_on={"a", "set"}))

    assert not (models / registry.LATEST).exists()
    assert not (models / "v1" / registry.CARD_FILE).exists() and registry.versions(str(models)) == []
    with pytest.raises(ModelError):
        registry.load(str(models / "v1"))  # half a version is not a model
    registry.publish(str(models), str(model_files["a"]), card("v1"))  # and does not block a retry
    assert (models / registry.LATEST).read_text() == "v1"


# ---------------------------------------------------------------- refusals


def published(tmp_path: Path, model_file: Path, **changes) -> Path:
    registry.publish(str(tmp_path / "models"), str(model_file), card("v1", **changes))
    return tmp_path / "models" / "v1"


def test_a_model_truncated_after_publishing_fails_its_checksum(tmp_path, model_files):
    version = published(tmp_path, model_files["a"])
    path = version / registry.MODEL_FILE
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(ModelError) as caught:
        registry.load(str(tmp_path / "models"))

    assert_one_line(caught, f"{path}: checksum mismatch", "refusing a modified or truncated model")


def test_a_model_with_one_byte_flipped_fails_its_checksum(tmp_path, model_files):
    version = published(tmp_path, model_files["a"])
    path = version / registry.MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(ModelError) as caught:
        registry.load(str(version))

    message = assert_one_line(caught, f"{path}: checksum mismatch")
    assert hashlib.sha256(bytes(data)).hexdigest()[:12] in message and sha256(model_files["a"])[:12] in message


def test_a_truncated_model_published_with_its_own_checksum_cannot_be_loaded(tmp_path, model_files):
    version = published(tmp_path, model_files["truncated"])

    with pytest.raises(ModelError) as caught:
        registry.load(str(version))

    assert_one_line(caught, f"{version / registry.MODEL_FILE}: cannot be loaded safely: ")


def test_a_lambda_layer_is_refused_by_safe_mode_even_with_a_valid_checksum(tmp_path, model_files):
    version = published(tmp_path, model_files["lambda"])
    assert json.loads((version / registry.CARD_FILE).read_text())["model_sha256"] == sha256(model_files["lambda"])

    with pytest.raises(ModelError) as caught:
        registry.load(str(version))

    message = assert_one_line(caught, f"{version / registry.MODEL_FILE}: cannot be loaded safely: ", "`Lambda` layer")
    assert len(message) < len(str(version)) + 400


def test_a_card_naming_8_classes_for_a_9_output_model_is_refused(tmp_path, model_files):
    version = published(tmp_path, model_files["a"], class_names=list(CLASS_NAMES[:8]))

    with pytest.raises(ModelError) as caught:
        registry.load(str(version))

    assert_one_line(caught, f"{version}: the card names 8 classes but the model has 9 outputs")


@pytest.mark.parametrize(
    "drop, named",
    [(["temperature"], "temperature"), (["alert_threshold", "class_names"], "class_names, alert_threshold"),
     (["model_sha256"], "model_sha256"), (["version"], "version")],
)  # fmt: skip
def test_a_card_missing_fields_is_refused_naming_them(tmp_path, model_files, drop, named):
    version = published(tmp_path, model_files["a"])
    path = version / registry.CARD_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in drop}))

    with pytest.raises(ModelError) as caught:
        registry.load(str(tmp_path / "models"))

    assert_one_line(caught, f"{path}: model card lacks {named}")


@pytest.mark.parametrize("text", ['{"version": "v1", "class_names": [', "", "\xff\xfe not utf-8"])
def test_a_card_that_is_not_json_is_refused(tmp_path, model_files, text):
    version = published(tmp_path, model_files["a"])
    path = version / registry.CARD_FILE
    path.write_bytes(text.encode("latin-1"))

    with pytest.raises(ModelError) as caught:
        registry.load(str(version))

    assert_one_line(caught, f"{path}: model card is not valid JSON")


@pytest.mark.parametrize("text", ["null", "42", '["version", "class_names", "model_sha256", "temperature", "alert_threshold"]'])
def test_a_card_that_is_json_but_not_an_object_is_refused(tmp_path, model_files, text):
    version = published(tmp_path, model_files["a"])
    path = version / registry.CARD_FILE
    path.write_text(text)

    with pytest.raises(ModelError) as caught:
        registry.load(str(version))

    assert_one_line(caught, str(path))


def test_a_directory_with_no_card_and_no_latest_is_not_a_model(tmp_path, model_files):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "model.keras").write_bytes(model_files["a"].read_bytes())

    with pytest.raises(ModelError) as caught:
        registry.load(str(tmp_path / "stuff"))

    assert_one_line(caught, f"{tmp_path / 'stuff'}: no model_card.json and no 'latest' pointer (not a model directory)")
    with pytest.raises(ModelError):
        registry.read_card(str(tmp_path / "missing"))


# ---------------------------------------------------------------- S3


@pytest.mark.integration
def test_publish_and_load_through_s3(s3, model_files, batch):
    models = f"{s3.make_bucket(f'registry-{uuid.uuid4().hex[:10]}')}/models"
    assert registry.publish(models, str(model_files["a"]), card("v1")) == f"{models}/v1"
    registry.publish(models, str(model_files["b"]), card("v2"))

    assert storage.read_bytes(f"{models}/{registry.LATEST}") == b"v1" and registry.versions(models) == ["v1", "v2"]
    registry.set_latest(models, "v2")
    loaded = registry.load(models)
    assert loaded.uri == f"{models}/v2" and loaded.card["model_sha256"] == sha256(model_files["b"])
    expected = keras.models.load_model(model_files["b"], compile=False).predict(batch, verbose=0)
    np.testing.assert_array_equal(loaded.model.predict(batch, verbose=0), expected)

    with pytest.raises(ModelError, match="version already exists"):
        registry.publish(models, str(model_files["a"]), card("v2"))
    storage.write_bytes(f"{models}/v1/{registry.MODEL_FILE}", model_files["a"].read_bytes()[:-1])
    with pytest.raises(ModelError, match="checksum mismatch"):
        registry.load(f"{models}/v1")
