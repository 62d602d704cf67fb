"""Real local services for the tests and the benchmarks: the demo's SeaweedFS server (melanoma.local) with an
upload helper, and a local Ray cluster of real `ray start` nodes.

Each node starts on free ports in its own temp dir, is waited for (bounded), and stops only its own processes,
found through psutil by a marker variable every process of the node inherits.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from melanoma.local import BIN_DIR, SeaweedServer, free_ports, log_tail

NODE_MARKER = "MELANOMA_TEST_RAY_NODE"


class S3Server(SeaweedServer):
    """The demo's SeaweedFS server, able to upload a local tree (the tests' fixtures)."""

    def upload_dir(self, local_dir, uri: str) -> int:
        """Upload every file below local_dir to s3://bucket/prefix keeping relative paths; returns the count."""
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        client = self.client()
        root = Path(local_dir)
        count = 0
        for path in sorted(root.rglob("*")):
            if path.is_file():
                key = "/".join(p for p in (prefix.strip("/"), path.relative_to(root).as_posix()) if p)
                client.upload_file(str(path), bucket, key)
                count += 1
        return count


def wait_until(check, timeout: float, what: str, log_path=None, alive=None, interval: float = 0.3):
    """Poll check() until it returns a truthy value. Fail fast if alive() turns False (the process died),
    or after timeout; both errors carry the tail of the process log."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"process exited while waiting for {what}{_log_note(log_path)}")
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - any failure just means "not ready yet"
            last_error = exc
        time.sleep(interval)
    last = f" (last error: {last_error!r})" if last_error is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{last}{_log_note(log_path)}")


def _log_note(log_path) -> str:
    return f"\n--- last lines of {log_path} ---\n{log_tail(log_path)}" if log_path else ""


def free_port_range(n: int, low: int = 20000, high: int = 32000) -> tuple[int, int]:
    """(first, last) of n consecutive free ports below the kernel's ephemeral range, for Ray worker ports."""
    for _ in range(100):
        first = random.randrange(low, high - n)
        if all(_port_is_free(p) for p in range(first, first + n)):
            return first, first + n - 1
    raise RuntimeError(f"no {n} consecutive free ports between {low} and {high}")


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # Ray binds worker ports on all interfaces
            return True
        except OSError:
            return False


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(ip, port) of every TCP socket in LISTEN state owned by pid."""
    connections = psutil.Process(pid).net_connections(kind="tcp")
    return sorted((c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN)


# ---------------------------------------------------------------- Ray


class RayNode:
    """One `ray start --block` process: the head or an added worker node, with its own temp dir.

    Every Ray process of the node (raylet, GCS, agents, and workers, which start their own session
    and rename themselves ray::IDLE) inherits NODE_MARKER=<temp dir> from `ray start`, so the node is
    found and killed without touching any other Ray cluster on the machine.
    """

    def __init__(self, args: list[str], temp_dir: Path, env: dict[str, str]):
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.temp_dir.parent / f"{self.temp_dir.name}.log"
        self.node_id: str | None = None
        ray_bin = shutil.which("ray", path=str(BIN_DIR)) or "ray"
        command = [ray_bin, "start", "--block", f"--temp-dir={self.temp_dir}", *args]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                command, env={**env, NODE_MARKER: str(self.temp_dir)}, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        self.pid = self._proc.pid

    def alive(self) -> bool:
        """True while `ray start --block` runs (it exits when its raylet or GCS dies)."""
        return self._proc.poll() is None

    def pids(self) -> list[int]:
        """Live processes of this node (zombies excluded), found by the marker variable in their environment."""
        found = []
        for process in psutil.process_iter(["status"]):
            if process.pid == os.getpid() or process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                if process.environ().get(NODE_MARKER) == str(self.temp_dir):
                    found.append(process.pid)
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return found

    def kill(self) -> None:
        """SIGKILL every process of this node at once: a node crash, for fault-tolerance tests."""
        self._signal_all(signal.SIGKILL)
        self._reap(10)
        wait_until(lambda: not self.pids(), 20, f"Ray node {self.temp_dir} processes to die after SIGKILL")

    def stop(self, timeout: float = 8) -> None:
        """SIGTERM makes `ray start --block` drain and stop its processes; SIGKILL whatever is left
        (after a Ray Data job it can ignore SIGTERM for half a minute)."""
        if self.alive():
            self._proc.terminate()
            self._reap(timeout)
        try:
            wait_until(lambda: not self.pids(), 5, "Ray processes to exit after SIGTERM")
        except TimeoutError:
            self.kill()

    def _reap(self, timeout: float) -> None:
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def _signal_all(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def train_on(cluster: "RayCluster", work: str, models: str, **overrides) -> str:
    """`melanoma train` of work into models on the cluster, driven from this process; returns models."""
    import ray

    from melanoma import train
    from melanoma.config import settings

    ray.init(address=cluster.address)
    try:
        train.train(settings(**overrides), work, models)
    finally:
        ray.shutdown()
    return models


class RayCluster:
    """A local Ray head node with token auth and its own ports, temp dir and HOME.

    Its processes inherit the current os.environ (so start it after the S3 server's AWS_* variables
    are set) plus env(): RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, and HOME points at a temp dir, so
    nothing reads or writes the real ~/.ray. A client process needs env() in its environment BEFORE it
    imports ray (Ray reads the auth mode once, at import).

    `ray start` swaps --node-ip-address=127.0.0.1 for the machine's reachable IP (Ray refuses loopback
    for multi-node clusters), and GCS/raylet gRPC ports listen on all interfaces: only the dashboard
    is loopback-only. 127.0.0.1:<port> reaches the GCS all the same.
    """

    def __init__(self, num_cpus: int = 4, token: str | None = None, root_dir=None):
        # Short path: Ray puts unix sockets under <temp-dir>/session_*/sockets (108-byte limit).
        self._own_root = root_dir is None
        self.root_dir = Path(root_dir or tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.home = self.root_dir / "home"
        self.num_cpus = num_cpus
        self.token = token or secrets.token_hex(16)
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.head: RayNode | None = None
        self.nodes: list[RayNode] = []

    def env(self) -> dict[str, str]:
        """Variables a process needs to be this cluster's client (token auth; no usage stats)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def auth_headers(self) -> dict[str, str]:
        """For plain HTTP calls to the dashboard (the Ray SDKs add it themselves from env())."""
        return {"Authorization": f"Bearer {self.token}"}

    def _node_env(self) -> dict[str, str]:
        self.home.mkdir(parents=True, exist_ok=True)
        # PATH: a job entrypoint's `python` must be this venv's, as when the venv is activated.
        path = f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, **self.env(), "HOME": str(self.home), "PATH": path}

    @staticmethod
    def _node_port_args(worker_ports: int) -> list[str]:
        first, last = free_port_range(worker_ports)
        manager, objects, agent_http, agent_grpc, runtime_env, metrics = free_ports(6)
        return [
            "--node-ip-address=127.0.0.1", f"--node-manager-port={manager}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--min-worker-port={first}", f"--max-worker-port={last}", "--disable-usage-stats",
        ]  # fmt: skip

    def start(self, timeout: float = 120) -> None:
        args = [
            "--head", f"--port={self.gcs_port}", f"--num-cpus={self.num_cpus}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}", *self._node_port_args(worker_ports=200),
        ]  # fmt: skip
        self.head = RayNode(args, self.root_dir / "head", self._node_env())
        try:
            what = f"Ray head at {self.address}"
            nodes = wait_until(self.alive_nodes, timeout, what, self.head.log_path, self.head.alive)
            self.head.node_id = nodes[0]["node_id"]
        except Exception:
            self._own_root = False  # keep the logs the error message points to
            self.stop()
            raise

    def alive_nodes(self) -> list[dict]:
        """Alive nodes from the dashboard's state API (dicts with node_id, node_ip, resources_total...)."""
        url = f"{self.dashboard_url}/api/v0/nodes?limit=1000"
        request = urllib.request.Request(url, headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=5) as response:
            nodes = json.load(response)["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def add_node(self, num_cpus: int = 1, timeout: float = 90) -> RayNode:
        """Join one more node on this machine; its handle's kill() simulates a node crash."""
        before = {n["node_id"] for n in self.alive_nodes()}
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}", *self._node_port_args(worker_ports=100)]
        node = RayNode(args, self.root_dir / f"node{len(self.nodes) + 1}", self._node_env())
        self.nodes.append(node)

        def joined():
            return [n["node_id"] for n in self.alive_nodes() if n["node_id"] not in before]

        node.node_id = wait_until(joined, timeout, "the new Ray node to join", node.log_path, node.alive)[0]
        return node

    def stop(self) -> None:
        """Stop added nodes, then the head; only this cluster's processes are touched."""
        for node in reversed(self.nodes):
            node.stop()
        if self.head is not None:
            self.head.stop()
        if self._own_root:
            shutil.rmtree(self.root_dir, ignore_errors=True)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
