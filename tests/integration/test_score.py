"""The nightly scoring job on a real SeaweedFS server and a real local Ray cluster."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from melanoma import layout, score, storage
from melanoma.config import settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_DATE = "2026-11-25"
CORRUPT = {
    "bad/zero.jpg": b"",
    "bad/text.jpg": b"just some notes, not a picture\n",
    "bad/error-page.png": b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>",
}


def _archive(shared_data: Path, root: Path, n: int) -> Path:
    """n real HAM10000 images in nested folders, a truncated JPEG and the CORRUPT files."""
    images = sorted((shared_data / "ham10000" / "images").glob("*.jpg"))[:n]
    for i, path in enumerate(images):
        target = root / f"clinic-{i % 3}" / "day" / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad" / "truncated.jpg").write_bytes(images[0].read_bytes()[:700])
    for name, data in CORRUPT.items():
        (root / name).write_bytes(data)
    return root


def _rows(output: str) -> list[dict]:
    fs, path = storage.pyarrow_fs(output)
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    return sorted(table.drop_columns(["scored_at"]).to_pylist(), key=lambda r: (r["image_id"], r["image_uri"]))


def _without_uri(rows: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "image_uri"} for r in rows), key=lambda r: r["image_id"])


@pytest.fixture(scope="module")
def local_archive(shared_data, tmp_path_factory) -> Path:
    return _archive(shared_data, tmp_path_factory.mktemp("archive"), 24)


@pytest.fixture(scope="module")
def s3_archive(s3, local_archive) -> str:
    bucket = s3.make_bucket("archive-score")
    s3.upload_dir(local_archive, f"{bucket}/{RUN_DATE}")
    return f"{bucket}/{RUN_DATE}"


@pytest.fixture(scope="module")
def s3_scores(s3, ray_cluster, trained_model, s3_archive) -> str:
    import ray

    ray.init(address=ray_cluster.address)
    try:
        output = s3.make_bucket("scores-score") + "/scores"
        score.score(settings(actors=2, score_batch_size=8), trained_model, s3_archive, output, RUN_DATE)
        return output
    finally:
        ray.shutdown()


def test_corrupt_files_become_error_rows(s3_scores, local_archive):
    rows = _rows(s3_scores)
    inputs = [p for p in local_archive.rglob("*") if p.is_file()]
    assert len(rows) == len(inputs) == 28
    errors = {r["image_id"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"zero", "text", "error-page", "truncated"}
    assert errors["zero"] == "empty file (0 bytes)"
    assert errors["text"] == "not an image (looks like text)"
    assert errors["error-page"] == "not an image (looks like HTML)"
    assert errors["truncated"].startswith("truncated or corrupt image")
    for r in rows:
        if r["error"]:
            assert r["melanoma_risk"] is None and r["flagged"] is None and r["predicted_class"] is None
        else:
            assert 0.0 <= r["melanoma_risk"] <= 1.0
            assert abs(sum(v for k, v in r.items() if k.startswith("p_")) - 1.0) < 1e-6
            assert r["melanoma_risk"] == r["p_melanoma"]


def test_schema_and_partitioning(s3_scores, trained_model):
    from melanoma import registry

    card = registry.read_card(trained_model)
    fs, path = storage.pyarrow_fs(s3_scores)
    top = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert top == {f"run_date={RUN_DATE}"}, "only partitions under the scores root"
    work = layout.night(s3_scores, RUN_DATE).work
    assert not storage.exists(work), f"the night's bookkeeping was left behind: {storage.list_files(work)}"
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    assert dataset.schema.remove(dataset.schema.get_field_index("run_date")) == layout.output_schema(card["class_names"])
    columns = layout.output_schema(card["class_names"]).names
    assert columns[:6] == ["image_id", "image_uri", "sha256", "melanoma_risk", "flagged", "predicted_class"]
    assert "p_basal_cell_carcinoma" in columns and "p_melanoma" in columns
    assert columns[-9:] == ["model_version", "scored_at", "error", *layout.IMAGE_STATS]
    summary = layout.read_summary(s3_scores, RUN_DATE)
    assert summary["rows"] == summary["unique_images"] == 28
    assert summary["errors"] == 4 and summary["scored"] == 24
    assert summary["model_version"] == card["version"]
    assert summary["flagged"] == sum(1 for r in _rows(s3_scores) if r["flagged"])


def test_local_dir_and_s3_give_identical_rows(ray_client, s3_scores, trained_model, local_archive, tmp_path):
    output = str(tmp_path / "scores")
    score.score(settings(actors=1, score_batch_size=8), trained_model, str(local_archive), output, RUN_DATE)
    local, remote = _rows(output), _rows(s3_scores)
    assert _without_uri(local) == _without_uri(remote)
    assert {r["image_uri"].replace(str(local_archive), "") for r in local} == {
        r["image_uri"].split(RUN_DATE, 1)[1] for r in remote
    }


def test_the_tflite_engine_scores_the_keras_risks_on_real_images(ray_client, s3_scores, trained_model, s3_archive, tmp_path):
    """The default engine on CPU is the model's TF-Lite export: its risks stay within 1e-5 of Keras's."""
    output = str(tmp_path / "scores")
    summary = score.score(settings(actors=1, score_batch_size=8, engine="keras"), trained_model, s3_archive, output, RUN_DATE)
    assert summary["engine"] == "keras" and layout.read_summary(s3_scores, RUN_DATE)["engine"] == "tflite"
    keras_rows, lite_rows = _rows(output), _rows(s3_scores)
    assert [r["image_uri"] for r in keras_rows] == [r["image_uri"] for r in lite_rows]
    scored = [(k, t) for k, t in zip(keras_rows, lite_rows) if k["error"] is None]
    assert len(scored) == 24
    probabilities = [c for c in keras_rows[0] if c.startswith("p_")] + ["melanoma_risk"]
    for k, t in scored:
        assert max(abs(k[c] - t[c]) for c in probabilities) < 1e-5, k["image_uri"]
        assert k["predicted_class"] == t["predicted_class"] and k["flagged"] == t["flagged"]


def test_tar_shards_give_the_same_rows_as_loose_files(ray_client, s3, s3_scores, trained_model, local_archive):
    files = sorted(p for p in local_archive.rglob("*") if p.is_file())
    bucket = s3.make_bucket("archive-tar")
    for k, shard in enumerate((files[::2], files[1::2])):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for p in shard:
                tar.add(p, arcname=str(p.relative_to(local_archive)))
        storage.write_bytes(f"{bucket}/{RUN_DATE}/shard-{k:03d}.tar", buf.getvalue())
    output = bucket + "/scores"
    score.score(settings(actors=1, score_batch_size=8), trained_model, f"{bucket}/{RUN_DATE}", output, RUN_DATE)
    assert _without_uri(_rows(output)) == _without_uri(_rows(s3_scores))
    assert all("#" in r["image_uri"] and r["image_uri"].split("#")[0].endswith(".tar") for r in _rows(output))


def test_rerun_of_a_finished_night_scores_nothing_new(ray_client, s3_scores, trained_model, s3_archive):
    before = _rows(s3_scores)
    summary = score.score(settings(), trained_model, s3_archive, s3_scores, RUN_DATE)
    assert summary["scored_this_run"] == 0
    assert _rows(s3_scores) == before


def test_killed_run_resumes_exactly_once(ray_cluster, s3, trained_model, shared_data, tmp_path):
    """SIGKILL the driver once some rows are written; the rerun scores only what is missing."""
    archive = _archive(shared_data, tmp_path / "archive", 400)
    bucket = s3.make_bucket("archive-kill")
    s3.upload_dir(archive, f"{bucket}/{RUN_DATE}")
    output = f"{bucket}/scores"
    command = [sys.executable, "-m", "melanoma.cli", "score", "--model", trained_model, "--input",
               f"{bucket}/{RUN_DATE}", "--output", output, "--run-date", RUN_DATE, "--batch-size", "8"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "MELANOMA_ROWS_PER_FILE": "8"}
    staging, checkpoints = layout.night(output, RUN_DATE).staging, layout.night(output, RUN_DATE).checkpoints
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        # kill once at least one block is committed (its checkpoint no longer pending)
        if storage.exists(checkpoints) and any(
            not f.path.endswith(".pending.parquet") for f in storage.list_files(checkpoints, (".parquet",))
        ):
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the run finished before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    written_before = len(storage.list_files(staging, (".parquet",)))
    assert not storage.exists(f"{output}/run_date={RUN_DATE}/_summary.json")

    rerun_started = datetime.now(timezone.utc)
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(storage.read_bytes(f"{output}/run_date={RUN_DATE}/_summary.json"))
    assert written_before >= 1
    assert summary["inputs_listed"] == summary["rows"] == summary["unique_images"] == 404
    fs, path = storage.pyarrow_fs(output)
    scored_at = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table(columns=["scored_at"])
    kept = sum(1 for t in scored_at.column("scored_at").to_pylist() if t < rerun_started)
    assert kept >= 1, "rows committed before the kill were scored again"
    assert summary["scored_this_run"] == 404 - kept
    rows = _rows(output)
    assert len({r["image_uri"] for r in rows}) == len(rows) == 404
    assert not storage.exists(staging)
    assert not storage.exists(checkpoints)


def test_a_night_left_in_the_earlier_layout_is_moved_out_said_once_and_ends_exactly_once(
    ray_client, trained_model, local_archive, tmp_path, caplog
):
    """An earlier version kept its bookkeeping inside the scores dataset (_inputs/, _staging/, _checkpoints/).
    Make the state it left when stopped between writing and promoting: two of the night's files still staged, their
    rows checkpointed, the input lists of this night and of an earlier one. The next run moves it out, says so once,
    and the night ends with every image once, none scored again."""
    output = tmp_path / "scores"
    s = settings(actors=1, score_batch_size=8, rows_per_file=8)
    score.score(s, trained_model, str(local_archive), str(output), RUN_DATE)
    before = _rows(str(output))
    partition = Path(layout.partition(str(output), RUN_DATE))
    staging, checkpoints = output / "_staging" / f"run_date={RUN_DATE}", output / "_checkpoints" / f"run_date={RUN_DATE}"
    staging.mkdir(parents=True)
    checkpoints.mkdir(parents=True)
    staged = sorted(partition.glob("*.parquet"))[:2]
    for path in staged:
        shutil.move(path, staging / path.name)
    uris = [u for path in staging.iterdir() for u in pq.read_table(path, columns=["image_uri"]).column("image_uri").to_pylist()]
    pq.write_table(pa.table({"image_uri": uris}), checkpoints / "block-1.parquet")
    for night in ("2026-11-24", RUN_DATE):
        (output / "_inputs" / f"run_date={night}").mkdir(parents=True)
        pq.write_table(pa.table({"image_uri": uris}), output / "_inputs" / f"run_date={night}" / "inputs.parquet")
    (partition / layout.SUMMARY).unlink()

    with caplog.at_level("WARNING", logger="melanoma.commit"):
        summary = score.score(s, trained_model, str(local_archive), str(output), RUN_DATE)
        score.score(s, trained_model, str(local_archive), str(output), RUN_DATE)
    said = [r.getMessage() for r in caplog.records if "earlier version" in r.getMessage()]
    assert len(said) == 1 and "_inputs, _staging, _checkpoints: 3 staged or checkpoint files" in said[0], said
    assert summary["files_written"] == 2 and summary["scored_this_run"] == 0
    assert summary["rows"] == summary["unique_images"] == len(before) == 28
    assert _rows(str(output)) == before
    assert [p.name for p in output.iterdir()] == [f"run_date={RUN_DATE}"]


@pytest.mark.timeout(120)
def test_an_actor_pool_that_takes_every_cpu_is_named_before_the_run(ray_client, caplog):
    """The 4-CPU test cluster: 4 one-CPU actors leave no CPU for reads (a run stands still), 3 do."""
    with caplog.at_level("WARNING", logger="melanoma.score"):
        score._warn_if_actors_take_every_cpu(settings(actors=3, cpus_per_actor=1.0))
        assert not caplog.records
        score._warn_if_actors_take_every_cpu(settings(actors=4, cpus_per_actor=1.0, score_stall_seconds=90))
    (record,) = caplog.records
    assert "4 actors x 1 CPUs take all 4 CPUs" in record.getMessage()
    assert "stops after 90 s; use --actors 3 here" in record.getMessage()
