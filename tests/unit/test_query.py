"""melanoma.query and melanoma.report on a small dataset written here in the scorer's schema: no services.

tests/integration/test_query_report.py asks the same questions of what the real scorer writes; these pin the
details: ordering, output formats, escaping of hostile names in lesion cards, pictures that went missing from
the archive, tar members, and Grad-CAM (which layer it uses, and that the heat sits where the risk came from).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_image

from melanoma import ensemble, gradcam, layout, query, registry, report
from melanoma import model as architectures
from melanoma.config import ARCHS, CLASS_NAMES, MELANOMA, snake_case

NIGHTS = ("2026-11-26", "2026-11-27")
HOSTILE = '"><img src=x onerror=alert(1)>'
ESCAPED = "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"  # as Jinja2 (MarkupSafe) escapes it
VERSION = "20261125-000000-tiny"


def row(uri: str, risk: float | None, error: str | None = None) -> dict:
    """A row as the scorer writes it: melanoma gets `risk`, the other classes share the rest."""
    probs = {c: None if risk is None else (risk if c == MELANOMA else (1 - risk) / (len(CLASS_NAMES) - 1)) for c in CLASS_NAMES}
    return {
        "image_id": uri.rsplit("/", 1)[-1].rsplit(".", 1)[0],
        "image_uri": uri,
        "sha256": None if risk is None else hashlib.sha256(uri.encode()).hexdigest(),
        "melanoma_risk": risk,
        "flagged": None if risk is None else risk >= 0.5,
        "predicted_class": None if risk is None else max(probs, key=probs.get),
        **{f"p_{snake_case(c)}": p for c, p in probs.items()},
        "model_version": VERSION,
        "scored_at": datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc),
        "error": error,
    }


@pytest.fixture
def scores(tmp_path) -> str:
    """Two nights. The first: a loose image, one with a hostile name, a tar member, an image since deleted from the
    archive (all four flagged), one low risk, and one error row."""
    archive = tmp_path / "archive"
    make_image(archive / "a.jpg", size=(80, 60), seed=1)
    make_image(archive / f"{HOSTILE}.jpg", size=(80, 60), seed=2)
    member = make_image(tmp_path / "member" / "c.jpg", size=(80, 60), seed=3)
    with tarfile.open(archive / "shard.tar", "w") as tar:
        tar.add(member, arcname="lesions/c.jpg")
    first = [
        row(f"{archive}/a.jpg", 0.9),
        row(f"{archive}/{HOSTILE}.jpg", 0.7),
        row(f"{archive}/shard.tar#lesions/c.jpg", 0.8),
        row(f"{archive}/gone.jpg", 0.6),
        row(f"{archive}/low.jpg", 0.1),
        row(f"{archive}/broken.jpg", None, "truncated or corrupt image: <bytes>"),
    ]
    second = [row(f"{archive}/a.jpg", 0.3), row(f"{archive}/low.jpg", 0.55)]
    schema = layout.output_schema(list(CLASS_NAMES))
    for night, rows in zip(NIGHTS, (first, second)):
        (tmp_path / "scores" / f"run_date={night}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "scores" / f"run_date={night}" / "part-0.parquet")
    return str(tmp_path / "scores")


def test_query_orders_riskiest_first_and_filters(scores):
    night = query.query(scores, date=NIGHTS[0])
    assert night.column("melanoma_risk").to_pylist() == [0.9, 0.8, 0.7, 0.6, 0.1, None]
    assert query.query(scores, date=NIGHTS[0], top=2).column("melanoma_risk").to_pylist() == [0.9, 0.8]
    assert query.query(scores, date=NIGHTS[0], flagged=True).num_rows == 4
    assert query.query(scores, min_risk=0.55).column("melanoma_risk").to_pylist() == [0.9, 0.8, 0.7, 0.6, 0.55]
    assert query.query(scores, cls=MELANOMA, since=NIGHTS[1]).column("melanoma_risk").to_pylist() == [0.55, 0.3]
    assert query.query(scores, cls=CLASS_NAMES[0]).column("melanoma_risk").to_pylist() == [0.1]
    assert query.query(scores, errors=True).column("image_id").to_pylist() == ["broken"]
    assert [str(d) for d in query.query(scores, top=1, until=NIGHTS[1]).column("run_date").to_pylist()] == [NIGHTS[0]]


def test_format_table_renders_every_kind_of_cell(scores):
    table = query.query(scores, errors=True).select(["run_date", "image_id", "melanoma_risk", "flagged", "scored_at", "error"])

    text = query.format_table(table, "table").splitlines()
    assert text[0].split() == ["run_date", "image_id", "melanoma_risk", "flagged", "scored_at", "error"]
    assert text[2].split()[:3] == [NIGHTS[0], "broken", "2026-11-26T03:00:00+00:00"]
    assert query.format_table(table, "csv").splitlines()[0] == ",".join(f'"{c}"' for c in table.column_names)
    assert json.loads(query.format_table(table, "json")) == [{
        "run_date": NIGHTS[0], "image_id": "broken", "melanoma_risk": None, "flagged": None,
        "scored_at": "2026-11-26T03:00:00+00:00", "error": "truncated or corrupt image: <bytes>",
    }]  # fmt: skip
    risky = query.format_table(query.query(scores, top=1).select(["melanoma_risk"]), "table").splitlines()
    assert risky[2] == "0.9000"


def test_morning_report_escapes_names_and_survives_missing_pictures(scores, tmp_path):
    out = tmp_path / "report.html"

    result = report.morning_report(scores, NIGHTS[0], str(out))

    page = out.read_text()
    assert (result["flagged"], result["shown"], result["heatmaps"], result["errors"]) == (4, 4, 0, 1)
    assert "<script" not in page and "<img src=x" not in page and ESCAPED in page
    assert page.count('class="thumb"') == 3  # a.jpg, the hostile name, the tar member
    assert page.count('class="missing"') == 1 and "gone.jpg: no such file" in page
    assert "truncated or corrupt image: &lt;bytes&gt;" in page
    assert "No model given (--model)" in page
    ids = ("a", "c", ESCAPED, "gone")  # riskiest first
    ranks = [page.index(f'<div class="id">{name}</div>') for name in ids]
    assert ranks == sorted(ranks), "lesions are not riskiest first"


@pytest.mark.parametrize("pooling", ["flatten", "global"])
def test_grad_cam_finds_the_last_feature_map(scores, tmp_path, pooling):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.Flatten()(x) if pooling == "flatten" else keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(len(CLASS_NAMES), activation="softmax")(x))
    model.save(tmp_path / "tiny.keras")
    card = {"version": VERSION, "class_names": list(CLASS_NAMES), "temperature": 1, "alert_threshold": 0.5, "input_size": [32, 32]}
    model_uri = registry.publish(str(tmp_path / "models"), str(tmp_path / "tiny.keras"), card)

    result = report.morning_report(scores, NIGHTS[0], str(tmp_path / "report.html"), model_uri=model_uri, heatmaps=2)

    assert result["heatmaps"] == 2
    assert (tmp_path / "report.html").read_text().count('class="heatmap"') == 2


def test_report_refuses_a_model_that_did_not_score_the_night(scores, tmp_path):
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(len(CLASS_NAMES))])
    model.save(tmp_path / "other.keras")
    card = {"version": "other", "class_names": list(CLASS_NAMES), "temperature": 1.0, "alert_threshold": 0.5}
    model_uri = registry.publish(str(tmp_path / "models"), str(tmp_path / "other.keras"), card)

    result = report.morning_report(scores, NIGHTS[0], str(tmp_path / "report.html"), model_uri=model_uri)

    assert result["heatmaps"] == 0
    assert f"the night was scored with {VERSION}: no heatmaps, no threshold" in (tmp_path / "report.html").read_text()


def red_model(keras, scale: float = 5.0):
    """A model whose melanoma logit is `scale` x the mean red of its 1x1-conv feature map."""
    import numpy as np

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    red = keras.layers.Conv2D(1, 1, use_bias=False, activation="relu")
    x = keras.layers.GlobalAveragePooling2D()(red(x))
    dense = keras.layers.Dense(len(CLASS_NAMES), activation="softmax")
    model = keras.Model(inputs, dense(x))
    red.set_weights([np.array([1.0, 0.0, 0.0], dtype="float32").reshape(1, 1, 3, 1)])
    weights = np.zeros((1, len(CLASS_NAMES)), dtype="float32")
    weights[0, CLASS_NAMES.index(MELANOMA)] = scale
    dense.set_weights([weights, np.zeros(len(CLASS_NAMES), dtype="float32")])
    return model


def red_square():
    import numpy as np

    picture = np.full((64, 64, 3), 40, dtype=np.uint8)
    picture[8:24, 40:56, 0] = 250  # top right
    return picture


def loaded(model, size: int = 32) -> registry.LoadedModel:
    return registry.LoadedModel(model, {"class_names": list(CLASS_NAMES), "input_size": [size, size, 3]}, "memory")


@pytest.mark.parametrize("members", [1, 2])
def test_grad_cam_points_at_what_raised_the_risk(members):
    """One red model, or an ensemble of two (nested models): the heat must sit on the red square."""
    keras = pytest.importorskip("keras")
    model = red_model(keras) if members == 1 else ensemble.build([red_model(keras, 5.0), red_model(keras, 2.0)])

    heat = gradcam.grad_cam(loaded(model))(red_square())

    assert heat.shape == (32, 32) and heat.max() == 1.0
    assert heat[4:12, 20:28].min() > 0.75 and heat[20:, :16].max() < 0.3


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "default"])
def test_grad_cam_uses_the_pooled_feature_map_of_every_architecture(arch):
    """Not the input, a resizing or an augmentation layer (4-D outputs at full size too): the downsampled map that
    the classifier pools; and a heat map comes out."""
    pytest.importorskip("keras")
    net = architectures.build(arch, len(CLASS_NAMES), 64)

    features = gradcam.feature_map(net)

    assert len(features.shape) == 4 and features.shape[1] < 64 and features.shape[-1] > 3
    heat = gradcam.grad_cam(loaded(net, 64))(red_square())
    assert heat.shape == (64, 64) and 0 <= heat.min() and heat.max() <= 1


def test_grad_cam_refuses_a_model_without_a_feature_map():
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(len(CLASS_NAMES))])

    with pytest.raises(registry.ModelError, match="no convolutional feature map before its classifier"):
        gradcam.grad_cam(loaded(model, 8))
