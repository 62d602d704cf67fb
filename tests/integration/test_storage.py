"""melanoma.storage against a real SeaweedFS server and a real local Ray cluster, and proof of the fixtures."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from melanoma import storage
from helpers import make_image
from melanoma.local import http_status
from services import listening_addresses

pytestmark = pytest.mark.integration

FILES = ["melanoma/ISIC_0000001.jpg", "melanoma/ISIC_0000002.jpg", "nevus/ISIC_0000003.png", "nevus/deep/x.jpeg"]


def unique(prefix: str) -> str:
    """A fresh bucket name per test: the server lives for the whole session."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def image_tree(tmp_path):
    """A small class-folder tree of real images plus one hidden file that listings must skip."""
    root = tmp_path / "images"
    for i, name in enumerate(FILES):
        make_image(root / name, fmt="PNG" if name.endswith(".png") else "JPEG", seed=i)
    (root / "nevus" / ".DS_Store").write_bytes(b"junk")
    return root


def relative_names(uri: str) -> list[str]:
    root = storage.pyarrow_fs(uri)[1]
    return [info.path[len(root) :].lstrip("/") for info in storage.list_files(uri)]


def test_list_files_gives_same_names_on_s3_and_local(s3, image_tree):
    uri = f"{s3.make_bucket(unique('list'))}/archive/2026-11-26"
    assert s3.upload_dir(image_tree, uri) == len(FILES) + 1

    assert relative_names(str(image_tree)) == sorted(FILES)
    assert relative_names(uri) == sorted(FILES)
    assert len(storage.list_files(uri, suffixes=(".png",))) == 1


def test_real_isic_class_folder_lists_the_same_after_upload(s3, shared_data):
    """Real file names (spaces in the class folder, "ISIC_0025509(1).jpg") survive the trip to S3 and back."""
    local = shared_data / "isic-9class" / "Train" / "basal cell carcinoma"
    uri = f"{s3.make_bucket(unique('isic'))}/Train/basal cell carcinoma"
    s3.upload_dir(local, uri)

    names = relative_names(uri)

    assert names == relative_names(str(local)) and any("(1)" in name for name in names)
    assert storage.read_bytes(f"{uri}/{names[0]}") == (local / names[0]).read_bytes()


def test_make_image_is_deterministic(tmp_path):
    from PIL import Image

    a, b, c = (make_image(tmp_path / f"{n}.png", fmt="PNG", seed=s) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    gray = make_image(tmp_path / "g.jpg", size=(30, 20), mode="L")
    with Image.open(gray) as image:
        assert (image.size, image.mode, image.format) == ((30, 20), "L", "JPEG")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_then_read_bytes_roundtrips(s3, tmp_path, where):
    base = s3.make_bucket(unique("rw")) if where == "s3" else str(tmp_path)
    uri = storage.join(base, "scores", "part-0.bin")
    data = os.urandom(100_000)

    storage.write_bytes(uri, data)

    assert storage.read_bytes(uri) == data
    assert storage.exists(uri)
    assert [info.size for info in storage.list_files(storage.join(base, "scores"))] == [len(data)]


def test_missing_bucket_is_named_in_the_error(s3):
    bucket = unique("missing")
    uri = f"s3://{bucket}/archive/x.jpg"
    for call in (storage.list_files, storage.read_bytes, storage.check_writable, lambda u: storage.write_bytes(u, b"x")):
        with pytest.raises(storage.StorageError, match=bucket):
            call(uri)
    with pytest.raises(storage.StorageError, match=f"bucket '{bucket}' does not exist"):
        storage.write_bytes(uri, b"x")  # the server must not create buckets on PUT (AWS does not either)


def test_wrong_credentials_give_access_denied(s3, monkeypatch):
    uri = s3.make_bucket(unique("auth"))
    storage.write_bytes(f"{uri}/a.txt", b"a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for call in (storage.list_files, storage.check_writable, lambda u: storage.read_bytes(f"{u}/a.txt")):
        with pytest.raises(storage.StorageError, match="access denied"):
            call(uri)
    with pytest.raises(storage.StorageError, match="access denied"):
        storage.write_bytes(f"{uri}/b.txt", b"b")


def test_missing_local_path_is_named_in_the_error(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(storage.StorageError, match=str(missing)):
        storage.list_files(str(missing))
    with pytest.raises(storage.StorageError, match=str(missing)):
        storage.read_bytes(str(missing / "x.jpg"))


def test_fsspec_fs_lists_the_same_objects(s3, image_tree):
    uri = s3.make_bucket(unique("fsspec"))
    s3.upload_dir(image_tree, f"{uri}/in")
    fs, path = storage.fsspec_fs(f"{uri}/in")

    listed = sorted(p for p in fs.find(path) if "/." not in p)

    assert listed == [info.path for info in storage.list_files(f"{uri}/in")]
    assert fs.cat_file(listed[0]) == (image_tree / FILES[0]).read_bytes()


def test_server_stop_and_start_keeps_port_and_data(s3):
    uri = f"{s3.make_bucket(unique('restart'))}/k.bin"
    storage.write_bytes(uri, b"survives")
    port, old_pid = s3.port, s3.pid
    s3.stop()
    try:
        assert s3.pid is None
        with pytest.raises(storage.StorageError, match="cannot reach"):
            storage.read_bytes(uri)
    finally:
        s3.start()
    assert (s3.port, s3.pid != old_pid) == (port, True)
    assert storage.read_bytes(uri) == b"survives"


def test_services_listen_on_loopback_only(s3, ray_cluster):
    weed = listening_addresses(s3.pid)
    assert ("127.0.0.1", s3.port) in weed
    assert {ip for ip, _ in weed} == {"127.0.0.1"}, f"weed listens beyond loopback: {weed}"

    ray_listeners = [a for pid in ray_cluster.head.pids() for a in listening_addresses(pid)]
    dashboard = {ip for ip, port in ray_listeners if port == ray_cluster.dashboard_port}
    assert dashboard == {"127.0.0.1"}, f"dashboard listeners: {dashboard}"
    assert http_status(f"{ray_cluster.dashboard_url}/api/version", ray_cluster.auth_headers()) == 200
    assert http_status(f"{ray_cluster.dashboard_url}/api/jobs/") == 401  # token auth is on


def test_ray_task_reads_from_seaweedfs(s3, ray_client):
    """The raylet started after the s3 fixture, so a worker finds the server through inherited AWS_* vars."""
    uri = f"{s3.make_bucket(unique('ray'))}/object.bin"
    storage.write_bytes(uri, b"from a ray worker")

    @ray_client.remote
    def read(u):
        from melanoma import storage as worker_storage

        return worker_storage.read_bytes(u), os.environ.get("HOME")

    data, home = ray_client.get(read.remote(uri), timeout=120)

    assert data == b"from a ray worker"
    assert home != os.path.expanduser("~"), "Ray workers must not share the real HOME (~/.ray)"


def test_job_submission_with_token_auth(s3, ray_cluster):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster.dashboard_url)
    code = "import os, ray; ray.init(); print('endpoint', os.environ['AWS_ENDPOINT_URL'], ray.cluster_resources()['CPU'])"
    job = client.submit_job(entrypoint=f'python -c "{code}"')

    deadline = time.monotonic() + 180
    while not client.get_job_status(job).is_terminal():
        assert time.monotonic() < deadline, f"job {job} not finished after 180 s:\n{client.get_job_logs(job)}"
        time.sleep(1)

    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
    assert f"endpoint {s3.endpoint}" in logs


def test_added_node_runs_tasks_and_can_be_killed(ray_cluster, ray_client):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray_client.remote  # defined in the test: workers cannot import test modules by name
    def where() -> str:
        return ray_client.get_runtime_context().get_node_id()

    node = ray_cluster.add_node(num_cpus=1)
    try:
        on_node = NodeAffinitySchedulingStrategy(node_id=node.node_id, soft=False)
        assert ray_client.get(where.options(scheduling_strategy=on_node).remote(), timeout=120) == node.node_id
        assert node.pids()

        node.kill()

        assert not node.alive() and not node.pids()
        assert ray_client.get(where.remote(), timeout=120) == ray_cluster.head.node_id
    finally:
        node.stop()
