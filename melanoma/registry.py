"""Model artifacts: <model-dir>/<version>/{model.keras, model_card.json, extra files} and a <model-dir>/latest pointer
(set by the first publish, then moved only by a promotion).

The card carries the sha256 of the model file and of every extra file published with it (card["files"]); loading
refuses a file whose checksum differs, a card whose classes do not match the model's outputs, and any layer that
Keras safe mode will not deserialize (Lambda layers carry arbitrary code).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from melanoma import storage
from melanoma.errors import MelanomaError

MODEL_FILE = "model.keras"
CARD_FILE = "model_card.json"
LATEST = "latest"


class ModelError(MelanomaError):
    """A one-line reason why a model artifact cannot be used."""


@dataclass
class LoadedModel:
    model: object  # keras.Model
    card: dict
    uri: str

    @property
    def class_names(self) -> list[str]:
        return self.card["class_names"]


def new_version(arch: str) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{arch}"


def publish(model_dir: str, model_file: str, card: dict, extras: dict[str, bytes] | None = None) -> str:
    """Copies the model and its extra files (name -> bytes, e.g. an exported engine) and writes the card with
    their checksums. The first version of a model dir becomes `latest` once all are complete; a later one waits
    beside it until `melanoma promote` compares it with `latest` (melanoma/promote.py)."""
    with open(model_file, "rb") as f:
        data = f.read()
    version = card["version"]
    target = storage.join(model_dir, version)
    if storage.exists(storage.join(target, CARD_FILE)):
        raise ModelError(f"{target}: version already exists")
    extras = extras or {}
    card = card | {
        "model_file": MODEL_FILE,
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "files": {name: hashlib.sha256(blob).hexdigest() for name, blob in extras.items()},
    }
    storage.write_bytes(storage.join(target, MODEL_FILE), data)
    for name, blob in extras.items():
        storage.write_bytes(storage.join(target, name), blob)
    storage.write_bytes(storage.join(target, CARD_FILE), json.dumps(card, indent=2).encode())
    if not storage.exists(storage.join(model_dir, LATEST)):
        set_latest(model_dir, version)
    return target


def versions(model_dir: str) -> list[str]:
    """The published versions of a model dir (those with a card), oldest name first."""
    fs, path = storage.pyarrow_fs(model_dir)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise storage.explain(model_dir, exc) from None
    names = [e.base_name for e in entries if e.type == pafs.FileType.Directory]
    return sorted(n for n in names if storage.exists(storage.join(model_dir, n, CARD_FILE)))


def set_latest(model_dir: str, version: str) -> None:
    """Points `latest` at a published version (one small object, replaced whole)."""
    if not storage.exists(storage.join(model_dir, version, CARD_FILE)):
        raise ModelError(f"{storage.join(model_dir, version)}: no such published version")
    storage.write_bytes(storage.join(model_dir, LATEST), version.encode())


def read_extra(version_dir: str, card: dict, name: str) -> bytes | None:
    """An extra file of a version, verified against its card; None when the version was published without it."""
    expected = card.get("files", {}).get(name)
    if expected is None:
        return None
    uri = storage.join(version_dir, name)
    if not storage.exists(uri):
        raise ModelError(f"{uri}: missing, but the card lists it")
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise ModelError(f"{uri}: checksum mismatch (file {digest[:12]}…, card {expected[:12]}…): refusing a modified or truncated file")
    return data


def resolve(model_uri: str) -> str:
    """A model dir (follows `latest`) or a version dir -> the version dir."""
    if storage.exists(storage.join(model_uri, CARD_FILE)):
        return model_uri
    latest = storage.join(model_uri, LATEST)
    if storage.exists(latest):
        return storage.join(model_uri, storage.read_bytes(latest).decode().strip())
    raise ModelError(f"{model_uri}: no {CARD_FILE} and no '{LATEST}' pointer (not a model directory)")


def read_card(model_uri: str) -> dict:
    uri = storage.join(resolve(model_uri), CARD_FILE)
    try:
        card = json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{uri}: model card is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(card, dict):
        raise ModelError(f"{uri}: model card is not a JSON object")
    missing = [k for k in ("version", "class_names", "model_sha256", "temperature", "alert_threshold") if k not in card]
    if missing:
        raise ModelError(f"{uri}: model card lacks {', '.join(missing)}")
    return card


def load(model_uri: str) -> LoadedModel:
    """Verified load: checksum, Keras safe mode, classes against outputs."""
    import keras

    version_dir = resolve(model_uri)
    card = read_card(version_dir)
    model_uri_file = storage.join(version_dir, card.get("model_file", MODEL_FILE))
    data = storage.read_bytes(model_uri_file)
    digest = hashlib.sha256(data).hexdigest()
    if digest != card["model_sha256"]:
        raise ModelError(f"{model_uri_file}: checksum mismatch (file {digest[:12]}…, card {card['model_sha256'][:12]}…): refusing a modified or truncated model")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        with open(path, "wb") as f:
            f.write(data)
        if not zipfile.is_zipfile(path):  # else Keras says "File not found" (of this temp copy) for a truncated file
            raise ModelError(f"{model_uri_file}: cannot be loaded safely: not a .keras zip archive (truncated or corrupt)")
        try:
            model = keras.models.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{model_uri_file}: cannot be loaded safely: {reason[:300]}") from None
    outputs = model.output_shape[-1]
    if outputs != len(card["class_names"]):
        raise ModelError(f"{version_dir}: the card names {len(card['class_names'])} classes but the model has {outputs} outputs")
    takes = list(model.input_shape[1:])
    if "input_size" in card and [c if t is None else t for c, t in zip(card["input_size"], takes)] != list(card["input_size"]):
        said = "x".join(map(str, card["input_size"]))
        raise ModelError(f"{version_dir}: the card says the model takes {said} images but it takes {'x'.join(map(str, takes))}")
    return LoadedModel(model=model, card=card, uri=version_dir)
