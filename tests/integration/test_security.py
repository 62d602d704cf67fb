"""Security on the real components (SeaweedFS with S3 auth, a Ray cluster with token auth, the real CLI):

- credentials never appear in anything a run writes: output files, summaries, the model dir, the CLI's stdout and
  stderr (also of a run refused for a wrong secret), the HTML report, the Ray cluster's session logs;
- S3 and the Ray dashboard answer on loopback only; Ray's GCS and raylet ports do listen beyond loopback (a Ray
  2.60 limitation, docs/reliability.md), and there a client without the cluster's token is refused;
- no path is ever built from image content: tar members named `../../etc/x.jpg`, `/tmp/...`, `<script>...`, with
  spaces, quotes, a line break or unicode are scored, stored verbatim, and nothing lands outside the output dir;
- the morning report escapes every file name (no markup, no script, no event handler gets through).

Cluster configs (token auth on every node, private dashboard) are checked in tests/unit/test_cluster_configs.py.
"""

from __future__ import annotations

import html.parser
import io
import json
import os
import posixpath
import re
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from markupsafe import escape

from melanoma import layout, registry
from melanoma.config import CLASS_NAMES
from services import listening_addresses

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_DATE = "2026-12-02"
IMAGE_SIZE = 180
EVIL = "<img src=x onerror=alert(1)>"
# tar member names: a scorer that extracted shards, or built any path from a name, would write outside its dirs
HOSTILE_MEMBERS = [
    "../../etc/x.jpg",
    "/tmp/melanoma-absolute-evil.jpg",
    "lesions/../../../../b-escape.jpg",
    "<script>alert(1)</script>.jpg",
    f"{EVIL}.jpg",
    "name with  spaces .jpg",
    "quote\"and'apostrophe&amp;.jpg",
    "line\nbreak.jpg",
    "ünïcødé 病変 😀.jpg",
]
# loose objects: S3 keys with markup, spaces and unicode (keys with `..` are not portable object names)
HOSTILE_KEYS = [f"{EVIL}.jpg", "<script>alert(2)</script>.jpg", "name with spaces.jpg", "ünïcødé 病変.jpg"]
BROKEN_KEY = f"{EVIL}-broken.jpg"  # truncated: an error row, shown in the report's error table


def tiny_model(path: Path) -> None:
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 5, strides=4, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CLASS_NAMES), activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)


@dataclass
class Run:
    archive: str  # s3://.../in
    shard: str  # s3://.../in/shards/night-0000.tar
    models: str  # s3:// model dir
    output: Path  # local scores root
    cwd: Path  # the CLI's working directory
    sandbox: Path  # every local file of the run is below here
    before: set[Path]  # files below sandbox before the run
    stdout: str
    stderr: str
    wrong_secret: str
    refused: subprocess.CompletedProcess  # the same command with a wrong secret key


def files_below(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def run(s3, ray_cluster, shared_data, tmp_path_factory) -> Run:
    """`melanoma score` (a real CLI process on the test cluster) over an S3 archive with hostile names, local output."""
    sandbox = tmp_path_factory.mktemp("security")
    pictures = sorted((shared_data / "ham10000" / "images").glob("*.jpg"))[: len(HOSTILE_MEMBERS) + len(HOSTILE_KEYS) + 1]
    bucket = s3.make_bucket("security-in").removeprefix("s3://")
    client = s3.client()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, picture in zip(HOSTILE_MEMBERS, pictures):
            info = tarfile.TarInfo(name)
            info.size = picture.stat().st_size
            tar.addfile(info, io.BytesIO(picture.read_bytes()))
    client.put_object(Bucket=bucket, Key="in/shards/night-0000.tar", Body=buffer.getvalue())
    for key, picture in zip(HOSTILE_KEYS, pictures[len(HOSTILE_MEMBERS) :]):
        client.put_object(Bucket=bucket, Key=f"in/loose/{key}", Body=picture.read_bytes())
    client.put_object(Bucket=bucket, Key=f"in/loose/{BROKEN_KEY}", Body=pictures[-1].read_bytes()[:500])

    models = s3.make_bucket("security-models") + "/models"
    tiny_model(sandbox / "tiny.keras")
    card = {"version": "20261202-000000-tiny", "class_names": list(CLASS_NAMES), "temperature": 1.0,
            "input_size": [IMAGE_SIZE, IMAGE_SIZE, 3],
            "alert_threshold": 0.0}  # fmt: skip  (0: every scored image is flagged, so every name is in the report)
    registry.publish(models, str(sandbox / "tiny.keras"), card)

    output = sandbox / "out"
    cwd = sandbox / "deep" / "er" / "cwd"
    cwd.mkdir(parents=True)
    before = files_below(sandbox)
    command = [sys.executable, "-m", "melanoma.cli", "score", "--model", models, "--input", f"s3://{bucket}/in",
               "--output", str(output), "--run-date", RUN_DATE, "--batch-size", "4"]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    wrong_secret = "wrong" + s3.secret_key[5:][::-1]
    refused = subprocess.run(command, env=env | {"AWS_SECRET_ACCESS_KEY": wrong_secret}, cwd=cwd, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    return Run(f"s3://{bucket}/in", f"s3://{bucket}/in/shards/night-0000.tar", models, output, cwd, sandbox, before,
               done.stdout, done.stderr, wrong_secret, refused)  # fmt: skip


def rows(output: Path) -> list[dict]:
    return pads.dataset(layout.partition(str(output), RUN_DATE), format="parquet").to_table().to_pylist()


# ---------------------------------------------------------------- credentials


def _leaks(blobs: dict[str, bytes], secrets_: dict[str, str]) -> list[str]:
    return [f"{what} in {where}" for where, data in blobs.items() for what, secret in secrets_.items() if secret.encode() in data]


def _ray_logs(ray_cluster) -> dict[str, bytes]:
    """Every regular file Ray wrote for the test cluster: session logs, the node's own log."""
    blobs = {}
    for path in [*ray_cluster.root_dir.glob("*.log"), *ray_cluster.head.temp_dir.rglob("*")]:
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 200 * 2**20:
            blobs[str(path)] = path.read_bytes()
    return blobs


@pytest.mark.timeout(900)
def test_credentials_never_appear_in_anything_written(run, s3, ray_cluster):
    secrets_ = {"the S3 secret key": s3.secret_key, "the wrong S3 secret key": run.wrong_secret,
                "the Ray auth token": ray_cluster.token}  # fmt: skip
    written = {str(p): p.read_bytes() for p in files_below(run.output)}
    assert any(p.endswith(".parquet") for p in written) and any(p.endswith(layout.SUMMARY) for p in written)
    client = s3.client()
    models_bucket, _, prefix = run.models.removeprefix("s3://").partition("/")
    for item in client.list_objects_v2(Bucket=models_bucket, Prefix=prefix)["Contents"]:
        written[f"s3://{models_bucket}/{item['Key']}"] = client.get_object(Bucket=models_bucket, Key=item["Key"])["Body"].read()
    assert any(k.endswith(registry.CARD_FILE) for k in written)
    written |= {"CLI stdout": run.stdout.encode(), "CLI stderr": run.stderr.encode(),
                "stdout of the refused run": run.refused.stdout.encode(), "stderr of the refused run": run.refused.stderr.encode()}  # fmt: skip
    assert _leaks(written, secrets_) == []

    assert run.refused.returncode == 1
    assert re.fullmatch(r"melanoma score: error: s3://\S+: access denied \(check the AWS credentials in the environment\)",
                        run.refused.stderr.strip().splitlines()[-1]), run.refused.stderr[-2000:]  # fmt: skip

    logs = _ray_logs(ray_cluster)
    assert len(logs) > 10 and any("/logs/" in p for p in logs), "no Ray session logs found"
    assert _leaks(logs, secrets_) == []
    assert _leaks({"SeaweedFS log": s3.log_path.read_bytes()}, {"the S3 secret key": s3.secret_key}) == []


# ---------------------------------------------------------------- listeners and token auth


def _machine_ip(ray_cluster) -> str:
    ip = ray_cluster.alive_nodes()[0]["node_ip"]
    assert not ip.startswith("127."), "this machine has no address but loopback: nothing to check"
    return ip


def _refused(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        try:
            s.connect((ip, port))
        except ConnectionRefusedError:
            return True
    return False


@pytest.mark.timeout(300)
def test_s3_and_the_ray_dashboard_answer_on_loopback_only(s3, ray_cluster):
    ip = _machine_ip(ray_cluster)
    assert {a for a, _ in listening_addresses(s3.pid)} == {"127.0.0.1"}
    assert _refused(ip, s3.port), f"SeaweedFS S3 answers on {ip}:{s3.port}"
    for flag, port in s3.ports.items():
        assert _refused(ip, port), f"SeaweedFS {flag} answers on {ip}:{port}"
    assert _refused(ip, ray_cluster.dashboard_port), f"the Ray dashboard answers on {ip}"


@pytest.mark.timeout(400)
def test_ray_gcs_listens_beyond_loopback_and_refuses_a_client_without_the_token(ray_cluster):
    """What is true with Ray 2.60 (docs/reliability.md): GCS and raylet bind every interface even with
    --node-ip-address=127.0.0.1, so on a shared network the token is what keeps strangers out."""
    ip = _machine_ip(ray_cluster)
    gcs = {a for pid in ray_cluster.head.pids() for a, port in listening_addresses(pid) if port == ray_cluster.gcs_port}
    assert gcs & {"0.0.0.0", "::"}, f"GCS now binds {gcs}: update docs/reliability.md, the limitation is gone"
    assert not _refused(ip, ray_cluster.gcs_port)

    code = f"import ray; ray.init(address='{ip}:{ray_cluster.gcs_port}'); print('CONNECTED', ray.cluster_resources())"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_USAGE_STATS_ENABLED": "0"}
    clients = {
        "the cluster's token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_cluster.token},  # the control
        "a wrong token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
        "no token": {"RAY_AUTH_MODE": "disabled"},
    }
    for name, env in clients.items():
        started = time.monotonic()
        try:
            client = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, timeout=180,
                                    cwd="/tmp")  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"a client with {name} neither connected nor failed within 180 s")
        said = [line for line in client.stderr.splitlines() if re.search("unauthenticated|token|auth", line, re.I)]
        print(f"{name}: exit {client.returncode} after {time.monotonic() - started:.0f} s", *said[:3], sep="\n  ")
        if name == "the cluster's token":
            assert client.returncode == 0 and "CONNECTED" in client.stdout, client.stderr[-2000:]
        else:
            assert client.returncode != 0 and "CONNECTED" not in client.stdout, f"a client with {name} got in"
            assert any("InvalidAuthToken" in line for line in said), client.stderr[-2000:]


# ---------------------------------------------------------------- hostile names and the report


@pytest.mark.timeout(600)
def test_hostile_names_are_scored_stored_verbatim_and_nothing_is_written_outside_the_output(run):
    found = rows(run.output)
    expected = {f"{run.shard}#{m}" for m in HOSTILE_MEMBERS} | {f"{run.archive}/loose/{k}" for k in [*HOSTILE_KEYS, BROKEN_KEY]}
    assert {r["image_uri"] for r in found} == expected and len(found) == len(expected)
    for r in found:
        name = r["image_uri"].split("#", 1)[1] if "#" in r["image_uri"] else r["image_uri"].rsplit("/", 1)[1]
        assert r["image_id"] == posixpath.splitext(posixpath.basename(name))[0]
        assert (r["error"] is None) == (name != BROKEN_KEY), (name, r["error"])

    new = files_below(run.sandbox) - run.before
    outside = sorted(str(p) for p in new if run.output not in p.parents)
    assert outside == [], f"written outside the output dir: {outside}"
    assert not any(run.cwd.iterdir()), "the CLI wrote into its working directory"
    for member in HOSTILE_MEMBERS:  # where an extracting or path-joining scorer would have put them
        for base in (run.cwd, run.output, Path("/")):
            target = Path(os.path.normpath(base / member.lstrip("/")))
            assert not target.exists(), f"{target} exists: a path was built from the member name {member!r}"


class _Markup(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.mark.timeout(600)
def test_the_morning_report_escapes_every_file_name(run, tmp_path):
    from melanoma import report

    out = tmp_path / "report.html"
    drawn = report.morning_report(str(run.output), RUN_DATE, str(out), heatmaps=0)
    assert drawn["flagged"] == drawn["shown"] == len(HOSTILE_MEMBERS) + len(HOSTILE_KEYS)
    page = out.read_text()
    markup = _Markup()
    markup.feed(page)
    tags = [t for t, _ in markup.tags]
    assert "script" not in tags
    assert [(t, a) for t, a in markup.tags if any(k.startswith("on") for k in a)] == []
    assert all(a.get("src", "").startswith("data:") for t, a in markup.tags if t == "img")
    assert "<script>alert" not in page and EVIL not in page
    for r in rows(run.output):
        assert escape(r["image_id"]) in page, r["image_id"]  # as the templates escape it
    assert escape(f"{run.archive}/loose/{BROKEN_KEY}") in page  # the error table
    assert json.loads(json.dumps(drawn))  # what it returns is plain data
