"""Finished nights read with the readers users point at a scores prefix, as they would type it (README, "Output
schema"): DuckDB and Polars over `<scores>/**/*.parquet` with Hive partitioning, a pyarrow dataset and pandas
over `<scores>`, on a local directory and on S3 (the real SeaweedFS server). Each must see every image exactly once,
with run_date a date and scored_at a UTC timestamp."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import s3fs

from melanoma import score, storage
from melanoma.config import settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NIGHTS = ("2026-11-24", "2026-11-25")
IMAGES_PER_NIGHT = 10
# run_date typed as the README shows for pyarrow and pandas (plain "hive" discovery gives a string)
PARTITIONING = pads.partitioning(pa.schema([("run_date", pa.date32())]), flavor="hive")


@pytest.fixture(scope="module")
def expected(shared_data, tmp_path_factory) -> tuple[Path, set[tuple[dt.date, str]]]:
    """An archive of two nights (different images, one corrupt file each) and the (run_date, image_uri) pairs."""
    root = tmp_path_factory.mktemp("readers-archive")
    images = sorted((shared_data / "ham10000" / "images").glob("*.jpg"))[: IMAGES_PER_NIGHT * len(NIGHTS)]
    pairs = set()
    for k, night in enumerate(NIGHTS):
        (root / night).mkdir()
        for path in images[k * IMAGES_PER_NIGHT : (k + 1) * IMAGES_PER_NIGHT]:
            shutil.copy(path, root / night / path.name)
        (root / night / "broken.jpg").write_bytes(b"not a picture")
        pairs |= {(dt.date.fromisoformat(night), str(p)) for p in (root / night).iterdir()}
    return root, pairs


@pytest.fixture(scope="module")
def outputs(s3, ray_cluster, trained_model, expected, tmp_path_factory) -> dict[str, str]:
    """Both nights scored from the local archive into a local directory and into S3, in small files."""
    import ray

    archive, _ = expected
    targets = {"local": str(tmp_path_factory.mktemp("readers-scores")), "s3": s3.make_bucket("readers") + "/scores"}
    ray.init(address=ray_cluster.address)
    try:
        for night in NIGHTS:
            for output in targets.values():
                s = settings(actors=1, score_batch_size=4, rows_per_file=4)
                score.score(s, trained_model, str(archive / night), output, night)
    finally:
        ray.shutdown()
    return targets


def _check(pairs: list[tuple[dt.date, str]], expected) -> None:
    _, want = expected
    assert len(pairs) == len(want), f"{len(pairs)} rows for {len(want)} images"
    assert set(pairs) == want


def _duckdb(s3) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.register_filesystem(s3fs.S3FileSystem(endpoint_url=s3.endpoint, key=s3.access_key, secret=s3.secret_key))
    return con


def _polars_options(s3) -> dict[str, str]:
    return {"aws_endpoint_url": s3.endpoint, "aws_access_key_id": s3.access_key, "aws_secret_access_key": s3.secret_key,
            "aws_region": s3.region, "aws_allow_http": "true"}  # fmt: skip


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("union_by_name", [False, True])
def test_duckdb_glob_over_the_scores_sees_each_image_once(outputs, expected, s3, where, union_by_name):
    glob = f"{outputs[where]}/**/*.parquet"
    options = "hive_partitioning = true" + (", union_by_name = true" if union_by_name else "")
    con = _duckdb(s3)
    relation = con.sql(f"SELECT run_date, image_uri, scored_at, flagged FROM read_parquet('{glob}', {options})")
    types = dict(zip(relation.columns, map(str, relation.types)))
    assert types["run_date"] == "DATE" and types["scored_at"] == "TIMESTAMP WITH TIME ZONE", types
    rows = relation.fetchall()
    _check([(r[0], r[1]) for r in rows], expected)
    (count,) = con.execute(f"SELECT count(*) FROM read_parquet('{glob}', {options})").fetchone()
    assert count == len(expected[1])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_polars_scan_over_the_scores_sees_each_image_once(outputs, expected, s3, where):
    frame = pl.scan_parquet(
        f"{outputs[where]}/**/*.parquet", hive_partitioning=True, storage_options=_polars_options(s3) if where == "s3" else None
    ).select("run_date", "image_uri", "scored_at", "flagged").collect()
    assert frame.schema["run_date"] == pl.Date and frame.schema["scored_at"] == pl.Datetime("us", "UTC"), frame.schema
    _check(list(zip(frame["run_date"].to_list(), frame["image_uri"].to_list())), expected)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_pyarrow_dataset_of_the_scores_sees_each_image_once(outputs, expected, where):
    fs, path = storage.pyarrow_fs(outputs[where])
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning=PARTITIONING).to_table()
    assert table.schema.field("run_date").type == pa.date32()
    assert table.schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    _check(list(zip(table.column("run_date").to_pylist(), table.column("image_uri").to_pylist())), expected)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pandas_read_parquet_of_the_scores_sees_each_image_once(outputs, expected, s3, where):
    options = {"storage_options": {"endpoint_url": s3.endpoint, "key": s3.access_key, "secret": s3.secret_key}} if where == "s3" else {}
    frame = pd.read_parquet(outputs[where], partitioning=PARTITIONING, **options)
    assert str(frame["scored_at"].dtype) == "datetime64[us, UTC]", frame.dtypes
    assert all(type(d) is dt.date for d in frame["run_date"]), frame["run_date"].head()
    _check(list(zip(frame["run_date"], frame["image_uri"])), expected)
    assert len(pd.read_parquet(outputs[where], **options)) == len(expected[1]), "without the typed partitioning"
