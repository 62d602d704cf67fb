"""The promotion rule, the paired AUC difference, the promotion log and the shadow layout: pure functions and local
files (the gate on real models and images: tests/integration/test_promotion.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import make_image
from melanoma import layout, promote, registry, storage
from melanoma.config import settings


def _report(auc=0.80, sensitivity=0.90, ece=0.05) -> dict:
    return {"melanoma_auc": auc, "sensitivity": sensitivity, "ece": ece}


def _auc(lower: float) -> dict:
    return {"difference": lower + 0.05, "difference_95": [lower, lower + 0.1]}


S = settings(promote_auc_margin=0.02, promote_sensitivity_margin=0.05, promote_ece_margin=0.03, target_sensitivity=0.90)


def test_the_rule_passes_a_candidate_that_is_not_worse_and_names_each_failed_test():
    assert promote.judge(_report(), _report(), _auc(-0.02), S)["passed"]
    refused = promote.judge(_report(sensitivity=0.80, ece=0.09), _report(), _auc(-0.021), S)
    assert not refused["passed"]
    assert {k: t["passed"] for k, t in refused["tests"].items()} == {"auc": False, "sensitivity": False, "ece": False}
    assert promote.why_refused(refused) == (
        "AUC difference lower 95% bound -0.021 < -0.020; sensitivity 0.800 < 0.850; ECE 0.090 > 0.080"
    )


def test_the_sensitivity_floor_is_latests_sensitivity_but_never_above_the_target():
    over_flagging = _report(sensitivity=1.0)  # a latest that flags nearly everything
    assert promote.judge(_report(sensitivity=0.86), over_flagging, _auc(0.0), S)["passed"]
    assert not promote.judge(_report(sensitivity=0.84), over_flagging, _auc(0.0), S)["passed"]
    low = _report(sensitivity=0.70)
    rule = promote.judge(_report(sensitivity=0.66), low, _auc(0.0), S)
    assert rule["passed"] and rule["tests"]["sensitivity"]["min"] == pytest.approx(0.65)


def test_the_paired_auc_difference_is_exactly_zero_for_the_same_risks_and_positive_for_a_better_model():
    rng = np.random.default_rng(3)
    positive = rng.random(200) < 0.3
    latest = np.clip(positive * 0.2 + rng.random(200) * 0.8, 0, 1)
    same = promote.paired_auc_difference(latest, latest, positive, draws=200)
    assert same == {"difference": 0.0, "difference_95": [0.0, 0.0]}
    better = np.clip(positive * 0.6 + rng.random(200) * 0.4, 0, 1)
    paired = promote.paired_auc_difference(better, latest, positive, draws=200)
    assert paired["difference_95"][0] > 0.1 and paired["difference_95"][0] < paired["difference"] < paired["difference_95"][1]


def _version(model_dir, name: str, created_at: str) -> str:
    card = {"version": name, "class_names": ["a"], "model_sha256": "0", "temperature": 1.0, "alert_threshold": 0.5,
            "created_at": created_at}
    storage.write_bytes(storage.join(str(model_dir), name, registry.CARD_FILE), json.dumps(card).encode())
    return name


def test_the_first_promotion_compares_nothing_and_is_logged(tmp_path):
    models = str(tmp_path / "models")
    _version(models, "v1", "2026-11-01T00:00:00+00:00")
    entry = promote.promote(S, "v1", models, "no-labels.csv", "no-images")  # nothing read: no latest to compare with
    assert entry["decision"] == "first" and entry["previous"] is None
    assert promote.current(models) == "v1"
    assert promote.history(models) == [entry]
    assert promote.decision_line(entry) == "promoted v1: the first version to be latest (nothing to compare with)"
    with pytest.raises(promote.PromotionError, match=r"models/v1: already latest"):
        promote.promote(S, "v1", models, "no-labels.csv", "no-images")


def test_a_candidate_must_be_a_version_published_in_the_model_dir(tmp_path):
    models = str(tmp_path / "models")
    _version(models, "v1", "2026-11-01T00:00:00+00:00")
    _version(tmp_path / "elsewhere", "v2", "2026-11-02T00:00:00+00:00")
    assert promote.candidate_version(models, f"{models}/v1/") == "v1"
    with pytest.raises(promote.PromotionError, match=r"elsewhere/v2: not a version of .*models \(publish it there"):
        promote.candidate_version(models, str(tmp_path / "elsewhere" / "v2"))
    with pytest.raises(promote.PromotionError, match=r"models/v3: no such published version"):
        promote.candidate_version(models, "v3")


def test_an_older_version_is_a_rollback(tmp_path):
    models = str(tmp_path / "models")
    _version(models, "b-later-name", "2026-11-01T00:00:00+00:00")
    _version(models, "a-earlier-name", "2026-11-02T00:00:00+00:00")
    assert promote.published_before(models, "b-later-name", "a-earlier-name")  # the card's time, not the name
    assert not promote.published_before(models, "a-earlier-name", "b-later-name")


def test_the_log_only_grows_one_object_per_entry(tmp_path):
    models = str(tmp_path / "models")
    first = {"time": "2026-11-01T10:00:00.000001+00:00", "candidate": "v1", "decision": "refused"}
    second = {"time": "2026-11-01T10:00:00.000002+00:00", "candidate": "v1", "decision": "forced"}
    promote.write_entry(models, second)
    promote.write_entry(models, first)
    assert promote.history(models) == [first, second]  # oldest first
    with pytest.raises(promote.PromotionError, match="a log entry of that name exists already"):
        promote.write_entry(models, first)
    assert len(list((tmp_path / "models" / promote.LOG_DIR).iterdir())) == 2


def test_labelled_images_are_checked_line_by_line(tmp_path):
    for name in ("ISIC_1", "ISIC_2", "ISIC_3"):
        make_image(tmp_path / "images" / f"{name}.jpg")
    labels = tmp_path / "labels.csv"

    def rows(text: str):
        labels.write_text(text)
        return promote.labelled_images(str(labels), str(tmp_path / "images"))

    good = rows("image_id,label\nISIC_1,melanoma\nISIC_2,nevus\nISIC_3,dermatofibroma\n")
    assert list(good["label_index"]) == [3, 4, 2] and good["uri"][0].endswith("images/ISIC_1.jpg")
    with pytest.raises(promote.PromotionError, match=r"labels.csv: missing column label \(labels need image_id,label\)"):
        rows("image_id,diagnosis\nISIC_1,melanoma\n")
    with pytest.raises(promote.PromotionError, match=r"labels.csv line 3: label 'MEL' is not one of the 9 classes"):
        rows("image_id,label\nISIC_2,nevus\nISIC_1,MEL\n")
    with pytest.raises(promote.PromotionError, match=r"labels.csv line 2: no image file ISIC_9.jpg under .*images"):
        rows("image_id,label\nISIC_9,nevus\n")
    with pytest.raises(promote.PromotionError, match=r"needs melanomas and other lesions; it has 0 melanomas in 2 rows"):
        rows("image_id,label\nISIC_1,nevus\nISIC_2,nevus\n")


def test_shadow_scores_and_their_bookkeeping_lie_outside_the_scores_dataset_and_the_main_nights():
    assert layout.shadow_root("/data/scores", "v2") == "/data/scores_shadow/v2"
    assert layout.shadow_work("/data/scores", "v2") == "/data/scores_work/shadow/v2"
    assert layout.shadow_work("s3://b/scores", "v2", "s3://b/jobs") == "s3://b/jobs/shadow/v2"
    main, shadow = layout.night("/data/scores", "2026-11-27"), layout.night("/data/scores_shadow/v2", "2026-11-27", "/data/scores_work/shadow/v2")
    assert not shadow.work.startswith(main.work) and not shadow.partition.startswith("/data/scores/")
    with pytest.raises(storage.StorageError, match=r"s3://b: scores at the root of a bucket leave no place beside them for shadow"):
        layout.shadow_root("s3://b", "v2")
