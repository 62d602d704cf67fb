"""The Ray internals melanoma/ray_adapter.py relies on, pinned: each test fails when an upgrade of Ray changes one.

No cluster is started: the checkpoint writer, DataContext and the exception classes are used in this process.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from ray.data import DataContext
from ray.data._internal.planner.plan_udf_map_op import _try_wrap_udf_exception
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX, CheckpointWriter
from ray.exceptions import RayTaskError, UserCodeException

from melanoma import ray_adapter, storage

SETTINGS = ("retried_io_errors", "execution_no_progress_timeout_s", "use_datasource_v2", "raise_original_map_exception")


def test_the_pending_suffix_is_the_one_ray_data_writes():
    assert PENDING_CHECKPOINT_SUFFIX == ".pending"
    assert ray_adapter.PENDING == ".pending.parquet"


def test_a_checkpoint_is_written_pending_and_committed_by_a_move(tmp_path):
    """Ray Data's two-phase checkpoint on disk: <id>.pending.parquet, then <id>.parquet (what commit.py repairs)."""
    config = CheckpointConfig(id_column="image_uri", checkpoint_path=str(tmp_path), override_filesystem=pafs.LocalFileSystem())
    writer = CheckpointWriter.create(config)
    pending = writer.write_pending_checkpoint(pa.array(["s3://b/a.jpg", "s3://b/b.jpg"]), "block-1")
    assert {p.name for p in tmp_path.iterdir()} == {"block-1.pending.parquet"}
    # the state a crash between the copy and the delete of an S3 move leaves
    (tmp_path / "block-1.parquet").write_bytes((tmp_path / "block-1.pending.parquet").read_bytes())
    assert ray_adapter.interrupted_commits({p.name for p in tmp_path.iterdir()}) == ["block-1.pending.parquet"]
    (tmp_path / "block-1.parquet").unlink()
    writer.commit_checkpoint(pending)
    assert {p.name for p in tmp_path.iterdir()} == {"block-1.parquet"}
    assert ray_adapter.interrupted_commits({"block-1.parquet", "block-2.pending.parquet"}) == []


def test_run_context_sets_ray_data_for_one_run_and_restores_it(tmp_path):
    ctx = DataContext.get_current()
    before = {name: getattr(ctx, name) for name in SETTINGS}
    with ray_adapter.run_context("image_uri", str(tmp_path), pafs.LocalFileSystem(), 90, ["AWS Error SLOW_DOWN"]):
        assert ctx.checkpoint_config.id_column == "image_uri"
        assert ctx.checkpoint_config.checkpoint_path == str(tmp_path)
        assert ctx.checkpoint_config.delete_checkpoint_on_success is False
        assert ctx.retried_io_errors == ["AWS Error SLOW_DOWN"]
        assert ctx.execution_no_progress_timeout_s == 90.0
        assert ctx.use_datasource_v2 is False and ctx.raise_original_map_exception is True
    assert ctx.checkpoint_config is None
    assert {name: getattr(ctx, name) for name in SETTINGS} == before


def test_run_context_restores_ray_data_after_a_failed_run(tmp_path):
    ctx = DataContext.get_current()
    before = {name: getattr(ctx, name) for name in SETTINGS}
    with pytest.raises(RuntimeError), ray_adapter.run_context("image_uri", str(tmp_path), pafs.LocalFileSystem(), 5, []):
        raise RuntimeError("the run failed")
    assert ctx.checkpoint_config is None and {name: getattr(ctx, name) for name in SETTINGS} == before


def test_a_map_function_error_is_raised_as_itself_inside_run_context(tmp_path):
    """Outside run_context Ray Data wraps it in UserCodeException (whose cause is lost on the way to the driver)."""
    error = storage.StorageUnavailable("s3://b/k.jpg: cannot reach the S3 endpoint")
    with pytest.raises(UserCodeException):
        _try_wrap_udf_exception(error)
    with ray_adapter.run_context("image_uri", str(tmp_path), pafs.LocalFileSystem(), 5, []):
        with pytest.raises(storage.StorageUnavailable):
            _try_wrap_udf_exception(error)


def _from_worker(cause: BaseException) -> RayTaskError:
    """What the driver receives for an exception raised in a worker: a RayTaskError that is also the cause's type."""
    traceback = f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{type(cause).__name__}: {cause}"
    return RayTaskError("MapWorker.submit", traceback, cause, proctitle="ray::MapWorker", pid=1, ip="127.0.0.1").as_instanceof_cause()


def test_a_worker_error_is_found_through_the_wrapper_as_one_line():
    worker = storage.StorageUnavailable("s3://b/k.jpg: cannot reach the S3 endpoint\nFailed to apply UDF transform after 1/1 attempts")
    received = _from_worker(worker)
    assert isinstance(received, storage.StorageUnavailable) and "ray::MapWorker" in str(received).splitlines()[0]
    explained = ray_adapter.user_error(received, "s3://b/scores")
    assert type(explained) is storage.StorageUnavailable
    assert str(explained) == "s3://b/k.jpg: cannot reach the S3 endpoint"


def test_a_storage_failure_of_a_write_task_is_explained_for_the_output():
    received = _from_worker(OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Could not connect to server"))
    explained = ray_adapter.user_error(received, "s3://b/scores")
    assert isinstance(explained, storage.StorageUnavailable)
    assert str(explained).startswith("s3://b/scores: cannot reach the S3 endpoint")


def test_any_other_failure_is_left_alone():
    assert ray_adapter.user_error(_from_worker(ZeroDivisionError("division by zero")), "s3://b/scores") is None
