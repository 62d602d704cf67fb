"""Confirmed diagnoses against real scores: HAM10000 images scored on two nights by the real scorer (Ray cluster,
SeaweedFS) with the session's trained model, night 2 by a copy of it whose alert threshold sits at the median risk
of night 1's melanomas (so that some melanomas are missed); outcomes, CSVs and the work dir on S3.

Checked: a CSV with bad rows writes nothing; the realised figures and the missed melanomas equal what the scored rows
and the HAM10000 diagnoses give when worked out here; the outcome source puts the confirmed images into an S3 work
dir, copied from the archive, deduplicated by content, night 1 on one side and night 2 on the held-out one.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from contextlib import redirect_stdout
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from melanoma import cli, dataset, outcomes, query, registry, score, sources, storage
from melanoma.config import MELANOMA, settings
from melanoma.ham10000 import HAM_TO_CLASS, METADATA

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 42
VAL, TEST = 0.1, 0.2


def first_night(side: str) -> str:
    day = date(2026, 11, 1)
    while sources.night_side(day.isoformat(), VAL, TEST, SEED) != side:
        day += timedelta(days=1)
    return day.isoformat()


TRAIN_NIGHT, TEST_NIGHT = first_night("train"), first_night("test")


def pairwise_auc(risk: list[float], positive: list[bool]) -> float | None:
    """AUC as the share of (melanoma, other) pairs ranked right, ties half: worked out apart from metrics.roc_auc."""
    pos = [r for r, p in zip(risk, positive) if p]
    neg = [r for r, p in zip(risk, positive) if not p]
    if not pos or not neg:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


@pytest.fixture(scope="module")
def nights(s3, ray_cluster, trained_model, small_work_dir, shared_data, tmp_path_factory):
    """Night 1: 4 melanomas, 4 nevi and one image of the training work dir; night 2: 2 new melanomas and 2 new nevi,
    plus night 1's melanomas again, scored by the copy with the median threshold."""
    import ray

    meta = pd.read_csv(shared_data / "ham10000" / METADATA).sort_values("image_id", ascending=False)
    known = set(dataset.read_manifest(small_work_dir)["sha256"])
    picked = {}
    for dx, n in (("mel", 6), ("nv", 6)):
        rows = meta[meta["dx"] == dx]
        for image_id, lesion in zip(rows["image_id"], rows["lesion_id"]):
            data = (shared_data / "ham10000" / "images" / f"{image_id}.jpg").read_bytes()
            if hashlib.sha256(data).hexdigest() not in known and lesion not in {p["lesion_id"] for p in picked.values()}:
                picked[image_id] = {"dx": dx, "lesion_id": lesion, "data": data}
            if sum(p["dx"] == dx for p in picked.values()) == n:
                break
    mel = [i for i, p in picked.items() if p["dx"] == "mel"]
    nv = [i for i, p in picked.items() if p["dx"] == "nv"]
    in_work = dataset.read_manifest(small_work_dir).iloc[0]
    bucket = s3.make_bucket(f"outcomes-{uuid.uuid4().hex[:8]}")
    archive = tmp_path_factory.mktemp("outcome-archive")
    night_images = {TRAIN_NIGHT: mel[:4] + nv[:4], TEST_NIGHT: mel[4:] + nv[4:] + mel[:4]}
    for night, ids in night_images.items():
        for image_id in ids:
            (archive / night).mkdir(exist_ok=True)
            (archive / night / f"{image_id}.jpg").write_bytes(picked[image_id]["data"])
    (archive / TRAIN_NIGHT / "from-training.jpg").write_bytes(storage.read_bytes(in_work["uri"]))
    s3.upload_dir(archive, f"{bucket}/archive")

    scores = f"{bucket}/scores"
    ray.init(address=ray_cluster.address)
    try:
        score.score(settings(actors=1, score_batch_size=16), trained_model, f"{bucket}/archive/{TRAIN_NIGHT}", scores, TRAIN_NIGHT)
        first = pads.dataset(storage.pyarrow_fs(scores)[1], filesystem=storage.pyarrow_fs(scores)[0], format="parquet").to_table()
        risks = dict(zip(first.column("image_id").to_pylist(), first.column("melanoma_risk").to_pylist()))
        median = float(np.median([risks[i] for i in mel[:4]]))
        version_dir = registry.resolve(trained_model)
        card = registry.read_card(version_dir)
        extras = {name: storage.read_bytes(storage.join(version_dir, name)) for name in card.get("files", {})}
        copy = registry.publish(f"{bucket}/models", storage.join(version_dir, registry.MODEL_FILE),
                                card | {"version": card["version"] + "-median", "alert_threshold": median}, extras)  # fmt: skip
        score.score(settings(actors=1, score_batch_size=16), copy, f"{bucket}/archive/{TEST_NIGHT}", scores, TEST_NIGHT)
    finally:
        ray.shutdown()
    diagnosis = {i: HAM_TO_CLASS[p["dx"]] for i, p in picked.items()} | {"from-training": in_work["label"]}
    lesions = {i: p["lesion_id"] for i, p in picked.items()}
    sha = {i: hashlib.sha256(p["data"]).hexdigest() for i, p in picked.items()}
    return {"bucket": bucket, "scores": scores, "diagnosis": diagnosis, "lesions": lesions, "mel": mel, "nv": nv,
            "sha": sha, "in_work_sha": in_work["sha256"]}  # fmt: skip


@pytest.fixture(scope="module")
def store(s3, nights) -> str:
    """The outcomes of every scored image, one of them named by its sha256 only, as a CSV on S3."""
    lines = ["image_id,sha256,diagnosis,confirmed_on,note,lesion_id"]
    for n, (image_id, diagnosis) in enumerate(sorted(nights["diagnosis"].items())):
        if n == 0:
            lines.append(f",{nights['sha'][image_id]},{diagnosis},2026-11-30,by content,{nights['lesions'][image_id]}")
        else:
            lines.append(f"{image_id},,{diagnosis},2026-11-30,,{nights['lesions'].get(image_id, '')}")
    csv = f"{nights['bucket']}/outcomes.csv"
    storage.write_bytes(csv, ("\n".join(lines) + "\n").encode())
    store = f"{nights['bucket']}/outcomes"
    added = outcomes.add(csv, store)
    assert (added.rows, added.added) == (len(nights["diagnosis"]), len(nights["diagnosis"]))
    return store


def test_a_csv_with_bad_rows_writes_nothing_to_s3(s3):
    bucket = s3.make_bucket(f"outcomes-{uuid.uuid4().hex[:8]}")
    csv = f"{bucket}/bad.csv"
    storage.write_bytes(csv, b"image_id,diagnosis,melanoma,confirmed_on\nISIC_1,nevus,,2026-11-30\n"
                             b"ISIC_2,melanoma,no,2026-11-30\nISIC_3,,perhaps,2026-11-30\n")  # fmt: skip
    refused = f"{bucket}/refused"
    with pytest.raises(outcomes.OutcomeError) as caught:
        outcomes.add(csv, refused)
    assert str(caught.value).splitlines() == [
        f"{csv}: 2 bad rows, nothing written",
        f"{csv} line 3: diagnosis 'melanoma' contradicts melanoma=no",
        f"{csv} line 4: melanoma must be yes, no, 1 or 0, got 'perhaps'",
    ]
    assert not storage.exists(refused)
    assert cli.main(["outcomes", "add", csv, "--store", refused]) == 1 and not storage.exists(refused)


def test_realised_figures_and_missed_melanomas_on_real_scores(nights, store):
    fs, path = storage.pyarrow_fs(nights["scores"])
    rows = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table().to_pylist()
    expected, missed_expected = [], set()
    for night in sorted((TRAIN_NIGHT, TEST_NIGHT)):
        scored = [r for r in rows if str(r["run_date"]) == night and r["error"] is None]
        positive = [nights["diagnosis"][r["image_id"]] == MELANOMA for r in scored]
        flagged = [r["flagged"] for r in scored]
        mel, other = sum(positive), len(positive) - sum(positive)
        expected.append({
            "run_date": night, "model_version": scored[0]["model_version"], "confirmed": len(scored), "melanomas": mel,
            "flagged": sum(flagged), "missed": sum(p and not f for p, f in zip(positive, flagged)),
            "sensitivity": sum(p and f for p, f in zip(positive, flagged)) / mel,
            "specificity": sum(not p and not f for p, f in zip(positive, flagged)) / other,
            "auc": pairwise_auc([r["melanoma_risk"] for r in scored], positive),
        })  # fmt: skip
        missed_expected |= {(night, r["image_id"]) for r, p, f in zip(scored, positive, flagged) if p and not f}

    missed, figures = query.realised(nights["scores"], store)

    nightly = [r | {"run_date": str(r["run_date"])} for r in figures.to_pylist() if r["run_date"] is not None]
    assert nightly == [e | {k: pytest.approx(e[k]) for k in ("sensitivity", "specificity", "auc")} for e in expected]
    by_night = {e["run_date"]: e for e in expected}
    assert by_night[TRAIN_NIGHT]["confirmed"] == 9 and (by_night[TEST_NIGHT]["confirmed"], by_night[TEST_NIGHT]["melanomas"]) == (8, 6)
    assert {(str(r["run_date"]), r["image_id"]) for r in missed.to_pylist()} == missed_expected
    # the copy's threshold is the median of night 1's melanoma risks: about half of those are missed on night 2
    assert sum(1 for night, i in missed_expected if night == TEST_NIGHT and i in nights["mel"][:4]) >= 1
    totals = [r for r in figures.to_pylist() if r["run_date"] is None]
    assert sorted(r["model_version"] for r in totals) == sorted(e["model_version"] for e in expected)

    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["query", nights["scores"], "--outcomes", store, "--date", TEST_NIGHT, "--format", "json"]) == 0
    printed = json.loads(out.getvalue())
    assert [r["image_id"] for r in printed["missed_melanomas"]] == [r["image_id"] for r in missed.to_pylist() if str(r["run_date"]) == TEST_NIGHT]
    assert [r["run_date"] for r in printed["realised"]] == [TEST_NIGHT, None]


def test_the_outcome_source_feeds_an_s3_work_dir(nights, store, small_work_dir):
    work = f"{nights['bucket']}/work"
    storage.write_parquet(storage.join(work, dataset.MANIFEST), dataset.read_manifest(small_work_dir))

    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["add-source", work, "--outcomes", store, "--scores", nights["scores"],
                         "--val-fraction", str(VAL), "--test-fraction", str(TEST), "--seed", str(SEED)]) == 0  # fmt: skip
    assert out.getvalue().startswith(f"{sources.OUTCOMES}: ")

    report = sources.read_sources(work)[sources.OUTCOMES]
    assert report["nights"] == {TRAIN_NIGHT: "train", TEST_NIGHT: "test"}
    assert report["groups_touching_work_dir_dropped"] == 1 and report["unreadable_dropped"] == 0
    manifest = dataset.read_manifest(work)
    added = manifest[manifest["source"] == sources.OUTCOMES].set_index("image_id")
    assert nights["in_work_sha"] not in set(added["sha256"])  # already in the work dir by content
    assert len(added) == 12  # the HAM10000 images, night 1's melanomas once
    # only the nevi of night 1 were never scored on the test night
    assert dict(added["split"]) == {i: "train" if i in nights["nv"][:4] else "test" for i in nights["mel"] + nights["nv"]}
    for image_id, row in added.iterrows():
        assert row["label"] == nights["diagnosis"][image_id] and row["melanoma"] == (row["label"] == MELANOMA)
        assert row["uri"] == storage.join(work, sources.OUTCOMES, f"{nights['sha'][image_id]}.jpg")
        assert hashlib.sha256(storage.read_bytes(row["uri"])).hexdigest() == row["sha256"] == nights["sha"][image_id]

    with redirect_stdout(io.StringIO()):
        assert cli.main(["add-source", work, "--outcomes", store, "--scores", nights["scores"]]) == 0
    assert len(dataset.read_manifest(work)) == len(manifest), "a second add found something new"
