"""Shared fixtures for tests against the REAL components: a SeaweedFS S3 server, a local Ray cluster, the
shared ISIC data, and a small model trained on it once per session. The processes are started by
tests/services.py (real `ray start` nodes, and the demo's SeaweedFS server from melanoma/local.py)."""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import pytest

from services import RayCluster, S3Server, train_on

REPO_ROOT = Path(__file__).resolve().parent.parent

# Ray reads RAY_AUTH_MODE once, when it is first imported, so the test process gets its token before any
# test module imports ray. The token also keeps a local ray.init() in a test from writing ~/.ray/auth_token.
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(RAY_ENV)


@contextmanager
def patched_environ(values: dict[str, str | None]):
    """Set (or, for None, remove) environment variables, and put the old values back afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A live SeaweedFS S3 server; while it lives, os.environ points every AWS client at it.

    A test that calls s3.stop() must call s3.start() again (same port and data) before it ends.
    """
    server = S3Server(tmp_path_factory.mktemp("seaweed"))
    server.start()
    overrides = {**server.env(), "AWS_ENDPOINT_URL_S3": None, "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None}
    try:
        with patched_environ(overrides):
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A local Ray head (4 CPUs, token auth, own HOME), started after `s3` so every worker has the AWS_* vars."""
    cluster = RayCluster(num_cpus=4, token=RAY_ENV["RAY_AUTH_TOKEN"])
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ray_client(ray_cluster):
    """This test process connected as a driver to `ray_cluster`."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_cluster.address)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared ISIC data directory (never copied into the repo); override with MELANOMA_SHARED_DATA."""
    path = Path(os.environ.get("MELANOMA_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data").resolve()
    missing = [p for p in (path / "isic-9class" / "Train", path / "ham10000") if not p.is_dir()]
    if missing:
        pytest.fail(
            f"shared test data missing: {', '.join(map(str, missing))}. Download the 9-class ISIC dataset "
            f"'Skin cancer ISIC' (Train folder) into {path}/isic-9class/Train/<class>/ and HAM10000 into "
            f"{path}/ham10000/, or set MELANOMA_SHARED_DATA to a directory that has them.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def small_work_dir(shared_data, tmp_path_factory) -> str:
    """A work dir (manifest + augmented samples) made from 16 real images per class, linked, not copied."""
    from melanoma import augment, dataset

    root = tmp_path_factory.mktemp("subset")
    for folder in sorted((shared_data / "isic-9class" / "Train").iterdir()):
        (root / "data" / folder.name).mkdir(parents=True)
        for f in sorted(folder.glob("*.jpg"))[:16]:
            (root / "data" / folder.name / f.name).symlink_to(f.resolve())
    work = str(root / "work")
    ground_truth = str(shared_data / "labels" / "isic2019_training_ground_truth.csv")
    dataset.make_split(str(root / "data"), work, 0.3, 42, ground_truth)
    augment.augment_work_dir(work, 42, add=4)
    return work


@pytest.fixture(scope="session")
def trained_model(ray_cluster, small_work_dir, tmp_path_factory) -> str:
    """A real model trained by 2 Ray Train workers for 2 epochs on small_work_dir; returns its model dir."""
    models = str(tmp_path_factory.mktemp("models"))
    return train_on(ray_cluster, small_work_dir, models, epochs=2, batch_size=16, workers=2)
