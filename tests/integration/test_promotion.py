"""The promotion gate and shadow scoring through the CLI, with real models on real labelled images on a real
SeaweedFS server (and, for shadow scoring, a real local Ray cluster)."""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import datetime, timezone

import pyarrow.dataset as pads
import pytest

from melanoma import cli, layout, promote, registry, storage
from melanoma.config import settings
from services import train_on

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_DATE = "2026-11-27"
# isic-9class images past the 16 per class that small_work_dir (and so every model here) trains and calibrates on.
# No nevi: models trained on 16 images per class rank melanomas among nevi no better than chance.
PICK = {"melanoma": 150, "pigmented benign keratosis": 38, "basal cell carcinoma": 38, "vascular lesion": 38,
        "dermatofibroma": 38}


@pytest.fixture(scope="module")
def labelled(shared_data, s3, tmp_path_factory) -> tuple[str, str]:
    """(labels CSV, images prefix) on S3: 302 isic-9class images no model here has seen."""
    train_root = shared_data / "isic-9class" / "Train"
    seen = {p.stem.split("(")[0] for folder in train_root.iterdir() for p in sorted(folder.glob("*.jpg"))[:16]}
    root = tmp_path_factory.mktemp("labelled")
    rows = []
    for label, n in PICK.items():
        unseen = [p for p in sorted((train_root / label).glob("*.jpg"))[16:] if "(" not in p.stem and p.stem not in seen]
        for p in unseen[:n]:
            (root / "images").mkdir(exist_ok=True)
            (root / "images" / p.name).symlink_to(p)
            rows.append((p.stem, label))
    text = io.StringIO()
    csv.writer(text).writerows([("image_id", "label"), *rows])
    bucket = s3.make_bucket("promotion")
    s3.upload_dir(root / "images", f"{bucket}/confirmed/images")
    storage.write_bytes(f"{bucket}/confirmed/labels.csv", text.getvalue().encode())
    return f"{bucket}/confirmed/labels.csv", f"{bucket}/confirmed/images"


@pytest.fixture(scope="module")
def good_model(ray_cluster, small_work_dir, tmp_path_factory) -> str:
    """The better model: the whole network fine-tuned for 5 epochs by one Ray Train worker (two workers' collective
    ops time out on a heavily loaded machine)."""
    models = str(tmp_path_factory.mktemp("good"))
    return train_on(ray_cluster, small_work_dir, models, epochs=5, batch_size=16, workers=1)


@pytest.fixture(scope="module")
def untrained_model(small_work_dir, tmp_path_factory) -> str:
    """The worse model: the default architecture never trained (ImageNet backbone, random head), evaluated, calibrated
    and published the way training publishes."""
    from melanoma import model, train
    from melanoma.config import CLASS_NAMES

    import keras

    s = settings()
    keras.utils.set_random_seed(s.seed)  # the same random head every run
    models = str(tmp_path_factory.mktemp("untrained"))
    _, val = train.training_tables(small_work_dir)
    train.publish_evaluated(model.build(s.arch, len(CLASS_NAMES), s.image_size), s, small_work_dir, val, models,
                            {"arch": "untrained", "epochs_run": 0})
    return models


def _republish(source_model_dir: str, model_dir: str, name: str, changes: dict) -> str:
    """Publishes the model of source_model_dir (with its extra files) into model_dir as a new version."""
    loaded = registry.load(source_model_dir)
    extras = {f: registry.read_extra(loaded.uri, loaded.card, f) for f in loaded.card.get("files", {})}
    card = {k: v for k, v in loaded.card.items() if k not in ("model_file", "model_sha256", "files")}
    card |= {"version": registry.new_version(name), "created_at": datetime.now(timezone.utc).isoformat()} | changes
    registry.publish(model_dir, storage.join(loaded.uri, registry.MODEL_FILE), card, extras)
    return card["version"]


@pytest.fixture(scope="module")
def model_dir(s3, good_model, untrained_model) -> tuple[str, dict]:
    """A registry on S3 holding, in order of publication, the worse model, the good one and the worse again. The
    worse one ships with an alert threshold no risk reaches (it would never alert): worse at the threshold whatever
    its AUC, so its refusal does not hang on how well the untrained head happens to rank."""
    root = s3.make_bucket("promotion-models") + "/models"
    never = {"alert_threshold": 1.01}
    versions = {name: _republish(source, root, name, changes) for name, source, changes in
                (("worse", untrained_model, never), ("good", good_model, {}), ("worse-again", untrained_model, never))}
    return root, versions


def _promote(model_dir: str, labelled: tuple[str, str], version: str, *flags: str) -> int:
    code = cli.main(["promote", version, "--model-dir", model_dir, "--labels", labelled[0], "--images", labelled[1], *flags])
    e = promote.history(model_dir)[-1]
    if "figures" in e:  # the figures the test saw, in its output with -s (past capsys)
        figures = {w: {k: round(e["figures"][w][k], 3) for k in promote.FIGURES} for w in ("candidate", "previous")}
        print(e["decision"], e["rule"]["auc_difference"], figures, file=sys.__stdout__)
    return code


def test_a_worse_candidate_is_refused_a_better_one_promoted_and_forced_and_rollback_are_logged(model_dir, labelled, capsys):
    root, v = model_dir
    fs, path = storage.pyarrow_fs(storage.join(root, registry.LATEST))
    fs.delete_file(path)  # publishing moved `latest`; here nothing has been promoted yet

    assert _promote(root, labelled, v["worse"]) == 0
    assert promote.current(root) == v["worse"]
    assert capsys.readouterr().out.startswith(f"promoted {v['worse']}: the first version")

    assert _promote(root, labelled, v["good"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"promoted {v['good']} (latest was {v['worse']})"
    assert "melanoma AUC (95%)" in out and "sensitivity" in out and "balanced accuracy" in out
    assert promote.current(root) == v["good"]

    assert _promote(root, labelled, v["worse-again"]) == 1
    captured = capsys.readouterr()
    refusal = [line for line in captured.err.splitlines() if line.startswith("melanoma promote:")]
    assert refusal == [refusal[0]] and refusal[0].startswith(f"melanoma promote: error: refused {v['worse-again']}: ")
    assert "sensitivity 0.000 < " in refusal[0]
    assert refusal[0].endswith(f"latest stays {v['good']}")
    assert "melanoma AUC (95%)" in captured.out
    assert promote.current(root) == v["good"]

    assert _promote(root, labelled, v["worse-again"], "--force") == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"forced {v['worse-again']} (latest was {v['good']}) (forced over: ")
    assert promote.current(root) == v["worse-again"]

    assert _promote(root, labelled, v["good"]) == 0  # published before the forced one: a rollback, and it passes
    assert capsys.readouterr().out.splitlines()[-1] == f"rolled back to {v['good']} (latest was {v['worse-again']})"
    assert promote.current(root) == v["good"]

    log = promote.history(root)
    assert [(e["decision"], e["candidate"], e["previous"], e["forced"]) for e in log] == [
        ("first", v["worse"], None, False),
        ("promoted", v["good"], v["worse"], False),
        ("refused", v["worse-again"], v["good"], False),
        ("forced", v["worse-again"], v["good"], True),
        ("rollback", v["good"], v["worse-again"], False),
    ]
    refused = log[2]
    assert not refused["rule"]["passed"] and not refused["rule"]["tests"]["sensitivity"]["passed"]
    assert not refused["rule"]["tests"]["auc"]["passed"], "the untrained head ranks melanomas worse beyond the margin"
    assert refused["figures"]["candidate"]["sensitivity"] == 0.0 and refused["figures"]["previous"]["sensitivity"] > 0.05
    assert refused["images_compared"] == sum(PICK.values()) and refused["figures"]["candidate"]["melanomas"] == PICK["melanoma"]
    assert log[1]["rule"]["passed"] and log[4]["rule"]["passed"]


def test_shadow_rows_land_apart_from_the_main_partition(ray_cluster, model_dir, labelled, s3, capsys):
    root, v = model_dir
    registry.set_latest(root, v["good"])
    archive = s3.make_bucket("promotion-archive")
    fs, path = storage.pyarrow_fs(labelled[1])
    for f in storage.list_files(labelled[1])[:12]:
        storage.write_bytes(f"{archive}/{RUN_DATE}/{f.base_name}", storage.read_bytes(storage.to_uri(fs, f.path)))
    scores = s3.make_bucket("promotion-scores") + "/scores"
    candidate = storage.join(root, v["worse-again"])

    code = cli.main(["nightly", "--date", RUN_DATE, "--model", root, "--archive", archive, "--output", scores,
                     "--shadow", candidate, "--batch-size", "8", "--address", ray_cluster.address])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and v["worse-again"] in lines[1]

    def rows(uri):
        fs, path = storage.pyarrow_fs(uri)
        return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pylist()

    main, shadow_root = rows(scores), layout.shadow_root(scores, v["worse-again"])
    shadow = rows(shadow_root)
    assert len(main) == len(shadow) == 12
    assert {r["model_version"] for r in main} == {v["good"]}
    assert {r["model_version"] for r in shadow} == {v["worse-again"]}
    assert {r["image_id"] for r in main} == {r["image_id"] for r in shadow}
    assert not shadow_root.startswith(scores + "/")
    assert json.loads(storage.read_bytes(layout.summary_uri(shadow_root, RUN_DATE)))["model_version"] == v["worse-again"]
    shadow_night = layout.night(shadow_root, RUN_DATE, layout.shadow_work(scores, v["worse-again"]))
    assert not storage.exists(shadow_night.work), "the shadow run's bookkeeping was left behind"
    assert shadow_night.work.startswith(layout.work_root(scores) + "/shadow/")  # apart from the main night's
