"""Does scoring throughput grow with nodes and actors, and what does one core do? (docs/capacity.md)

    python benchmarks/scaling.py components [--count 64] [--sizes 200x150,180x180,600x450,1024x768] [--model-sizes 128,180]
    python benchmarks/scaling.py nodes   [--limit 1000] [--batch-size 32] [--node-cpus 2]
    python benchmarks/scaling.py actors  [--limit 1000] [--max-actors 2]
    python benchmarks/scaling.py archive [--limit 1000 --copies 2]        # full size: --limit 0 --copies 10
    python benchmarks/scaling.py listing [--rows 1000000]
    python benchmarks/scaling.py capacity [--prices c7i.4xlarge=0.714,g5.xlarge=1.006,head=0.2016] [--latency-ms 100]

components  single-thread CPU cost of each pipeline stage, per core: decode+resize (melanoma.images) of JPEGs
            at each size (HAM10000 images upscaled with Lanczos, JPEG q90), sha256, and inference of the
            default model (untrained: speed does not depend on the weights) through its TF-Lite export on 1 thread.
nodes       a real local Ray cluster (services.RayCluster, token auth): the head alone, then head + one
            added node, each pinned to its own physical core (sched_setaffinity is inherited by every
            process of the node), one Scorer actor per node; the driver connects with ray.init(address=...)
            and scores the same loose archive (the first --limit HAM10000 images on SeaweedFS) each time.
            Each node is `ray start --num-cpus 2` on its one core by default: with --node-cpus 1 the 1-CPU
            actor (Ray Data fuses prepare into it) takes every CPU and the read/write tasks never run (the
            job hangs); with --cpus-per-actor 0 it runs, but Ray puts both actors on the head.
actors      one unpinned node (--max-actors + 1 logical CPUs), 1..--max-actors Scorer actors of 1 CPU each.
archive     make_archive.build() re-keys HAM10000 (--copies) as loose files and as tar shards; times
            archive.list_inputs on each layout, then scores each (unless --no-score) on one node, with the
            peak memory (PSS) of the driver, of the S3 server and of every Ray worker process.
listing     driver-side cost of N inputs: archive.list_inputs over N synthetic keys (storage.list_files is
            replaced by a list of N FileInfo, no I/O) and the inputs parquet; then commit.already_scored
            and the counts of commit.finish over a local partition of N synthetic rows of the output schema.
capacity    no measurement: the capacity model of docs/capacity.md (nodes for 10^4/10^5/10^6 images in the
            window, $ per 10^6 images) from per-image costs and prices given as flags (defaults: the
            figures measured for docs/capacity.md, example prices).

Every figure is printed with the load average before and after it: on a shared machine images/s per
wall-second is distorted by other work, so the CPU-seconds each measurement used are printed too
(utime+stime of every process of the Ray nodes, of the driver and of SeaweedFS, sampled every second per
process; the sampler's own CPU is subtracted from the driver's). Steady images/s counts the rows between
the first and the last scored batch (their scored_at), leaving out start-up and the write tail.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# Ray reads the auth mode once, at import: the token must be in the environment before anything imports ray.
TOKEN = secrets.token_hex(16)
os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0"})
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # services: the tests' local Ray cluster

import numpy as np  # noqa: E402
from make_archive import DEFAULT_IMAGES, build, load, print_stats, source_files  # noqa: E402
from score_throughput import model_flops, publish_untrained, upload  # noqa: E402

RUN_DATE = "2026-11-25"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_CPUS = sorted(os.sched_getaffinity(0))
TIMEOUT = [1800]  # seconds per scoring run (--timeout)


def _raise_timeout(*_):
    raise TimeoutError(f"scoring run took longer than --timeout {TIMEOUT[0]} s")


# ---------------------------------------------------------------- measuring


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """utime+stime of one process (all its threads), None once it is gone."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else None


def pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            parts = f.read().split(b"\0")
    except OSError:
        return "?"
    head = parts[0].decode(errors="replace")
    if head.startswith("ray::"):
        return head.strip()
    names = [os.path.basename(p.decode(errors="replace")) for p in parts[:3] if p]
    return " ".join(n for n in names if not n.startswith("-"))[:60] or "?"


class Sampler:
    """Peak PSS and CPU time of every process of interest, sampled every `interval` s: the driver (this
    process alone), SeaweedFS, and each Ray node's processes (found by the node's marker,
    services.RayNode.pids()). CPU time is kept per process (cutime is not used: a worker's time reaches
    its parent only if the parent waits for it), so a process that exits loses at most its last interval."""

    def __init__(self, nodes: dict, server_pid: int | None, interval: float = 1.0):
        self.nodes, self.server_pid, self.interval = nodes, server_pid, interval
        self.peak: dict[int, int] = {}
        self.label: dict[int, str] = {}
        self.where: dict[int, str] = {}
        self.peak_total = 0
        self.times: list[float] = []
        self.cpu: dict[int, dict[int, float]] = {}  # pid -> {sample index: CPU-seconds so far}
        self.own: list[float] = []  # this sampler's own CPU-seconds so far (it runs in the driver) at each sample
        self._own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        seen = {os.getpid(): "driver"}
        if self.server_pid:
            seen[self.server_pid] = "seaweedfs"
        for name, node in self.nodes.items():
            for pid in node.pids():
                seen[pid] = name
        index = len(self.times)
        self.times.append(time.time())
        self.own.append(self._own_cpu)
        total = 0
        for pid, where in seen.items():
            used = cpu_seconds(pid)
            if used is not None:
                self.cpu.setdefault(pid, {})[index] = used
            value = pss(pid)
            total += value
            self.where[pid] = where
            if value > self.peak.get(pid, 0):
                self.peak[pid] = value
            t = title(pid)
            if pid not in self.label or ("IDLE" not in t and t != "?"):
                self.label[pid] = t  # the last non-idle role of a pooled worker ("?": exiting, cmdline gone)
        self.peak_total = max(self.peak_total, total)

    def _run(self):
        while not self._stop.is_set():
            started = time.thread_time()
            self._sample()
            self._own_cpu += time.thread_time() - started
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def report(self, indent: str = "    ") -> list[str]:
        lines = [f"{indent}peak PSS, sum of all sampled processes at one instant: {self.peak_total / 2**20:.0f} MiB"]
        order = sorted(self.peak, key=lambda p: (self.where[p] != "driver", self.where[p], -self.peak[p]))
        for pid in order:
            if self.where[pid] in ("driver", "seaweedfs") or self.label[pid].startswith("ray::") or self.peak[pid] > 150 * 2**20:
                lines.append(f"{indent}  {self.where[pid]:9s} pid {pid:7d} {self.peak[pid] / 2**20:7.0f} MiB  {self.label[pid]}")
        return lines

    def workers_per_node(self, word: str) -> dict[str, int]:
        """Processes per node whose (last non-idle) title holds `word`: "Scorer" actors, "prepare" tasks."""
        counts = {}
        for pid, label in self.label.items():
            if label.startswith("ray::") and word in label:
                counts[self.where[pid]] = counts.get(self.where[pid], 0) + 1
        return counts

    def cpu_between(self, t0: float | None = None, t1: float | None = None) -> dict[str, float]:
        """CPU-seconds each group (driver, seaweedfs, each node) used between t0 and t1 (default: the whole
        sampling), linear between samples; a process seen first at sample k had 0 s at sample k-1 (it was
        born in between; except at the first sample), and keeps its last value after it exits."""
        t0 = self.times[0] if t0 is None else t0
        t1 = self.times[-1] if t1 is None else t1
        used: dict[str, float] = {}
        for pid, values in self.cpu.items():
            first, last = min(values), max(values)
            points = dict(values)
            if first > 0:
                points[first - 1] = 0.0
            times = [self.times[i] for i in sorted(points)]
            series = [points[i] for i in sorted(points)]
            delta = float(np.interp(t1, times, series) - np.interp(t0, times, series))
            used[self.where[pid]] = used.get(self.where[pid], 0.0) + delta
        if "driver" in used:  # the sampler's own /proc reading is not the driver's work
            sampler = float(np.interp(t1, self.times, self.own) - np.interp(t0, self.times, self.own))
            used["driver"] -= sampler
            used["sampler"] = sampler
        return used


@contextmanager
def pinned(cpus):
    """Processes started inside inherit this affinity (a Ray node started here stays on `cpus`)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def steady_rate(output: str) -> tuple:
    """(images/s between the first and the last scored batch, seconds spanned, first and last time, rows
    scored in between) from the rows' scored_at (one stamp per Scorer batch): start-up (worker and
    TensorFlow start, model load) and the write/promote tail are left out."""
    import pyarrow.dataset as pads

    from melanoma import layout, storage

    fs, path = storage.pyarrow_fs(layout.partition(output, RUN_DATE))
    stamps = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["scored_at"]).column("scored_at")
    values = np.sort(np.array(stamps.cast("int64").to_numpy(zero_copy_only=False)))
    span = (values[-1] - values[0]) / 1e6
    if span <= 0:
        return None, None, None, None, 0
    rows = len(values) - int((values == values[0]).sum())
    return rows / span, span, values[0] / 1e6, values[-1] / 1e6, rows


def score_once(label: str, s, model_dir: str, input_uri: str, output: str, nodes: dict, server) -> dict:
    from melanoma import score

    before_load = load()
    with Sampler(nodes, server.pid) as sampler:
        started = time.time()
        signal.alarm(TIMEOUT[0])  # bounded: SIGALRM raises TimeoutError in this (the main) thread
        try:
            summary = score.score(s, model_dir, input_uri, output, RUN_DATE)
        finally:
            signal.alarm(0)
        seconds = time.time() - started
        time.sleep(1.5)  # one more sample after the end
    whole = sampler.cpu_between()
    cpu_driver, cpu_server = whole.pop("driver", 0.0), whole.pop("seaweedfs", 0.0)
    cpu_sampler = whole.pop("sampler", 0.0)
    cpu_nodes = sum(whole.values())
    rate, span, t0, t1, steady_rows = steady_rate(output)
    steady_cpu = sampler.cpu_between(t0, t1) if span else {}
    steady_nodes = sum(v for k, v in steady_cpu.items() if k not in ("driver", "seaweedfs", "sampler"))
    rows = summary["scored_this_run"]
    result = {
        "label": label, "rows": rows, "errors": summary["errors"], "seconds": seconds, "job_rate": rows / seconds,
        "steady_rate": rate, "steady_span": span, "steady_rows": steady_rows, "steady_cpu": steady_cpu,
        "steady_per_cpu": steady_rows / steady_nodes if steady_nodes > 0 else None,
        "cpu_nodes": cpu_nodes, "cpu_driver": cpu_driver,
        "cpu_server": cpu_server, "load_before": before_load, "load_after": load(), "sampler": sampler,
    }
    print(f"  {label}: {rows} rows ({summary['errors']} errors) in {seconds:.1f} s = {rows / seconds:.1f} img/s whole job; "
          f"steady {rate or float('nan'):.1f} img/s ({steady_rows} rows over {span or 0:.1f} s)")
    if span:
        print(f"    first batch scored {t0 - started:.1f} s after the call (listing, start-up), last batch "
              f"{started + seconds - t1:.1f} s before the return (write, promote, summary)")
    print(f"    CPU-seconds, whole job: Ray nodes {cpu_nodes:.1f}, driver {cpu_driver:.1f}, SeaweedFS {cpu_server:.1f} "
          f"(this script's sampler {cpu_sampler:.1f}, not counted in the driver)")
    print(f"    CPU-seconds, steady span: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(steady_cpu.items()))
          + (f" -> {result['steady_per_cpu']:.1f} img per node-CPU-second" if result["steady_per_cpu"] else ""))
    if span:
        print("    cores each got during the steady span (CPU-s / s): "
              + ", ".join(f"{k} {v / span:.2f}" for k, v in sorted(steady_cpu.items())))
    print(f"    Scorer actors per node {sampler.workers_per_node('Scorer')}, prepare workers per node "
          f"{sampler.workers_per_node('prepare')}")
    print(f"    before: {before_load}\n    after:  {result['load_after']}")
    return result


@contextmanager
def s3_with_model(tmp: Path):
    from melanoma.local import SeaweedServer

    with SeaweedServer(tmp / "s3") as server:
        os.environ.update(server.env())
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        bucket = server.make_bucket("scaling")
        model_dir = f"{bucket}/models"
        publish_untrained(model_dir)
        yield server, bucket, model_dir


@contextmanager
def connected(cluster):
    import ray

    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- modes


def mode_nodes(args) -> None:
    from melanoma.config import settings
    from services import RayCluster

    if len(ALL_CPUS) < 2 and args.pin:
        sys.exit("--pin needs 2 CPUs")
    files = source_files(args.images, args.limit)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, s3_with_model(Path(tmp)) as (server, bucket, model_dir):
        upload(files, f"{bucket}/archive")
        print(f"{len(files)} HAM10000 images uploaded as loose files; nodes of --num-cpus {args.node_cpus}, "
              f"pinned to one core each: {args.pin}; actors per node {args.actors_per_node} x {args.cpus_per_actor} CPU")
        cluster = RayCluster(num_cpus=args.node_cpus, token=TOKEN, root_dir=Path(tmp) / "ray")
        results = []
        try:
            with pinned(ALL_CPUS[:1] if args.pin else ALL_CPUS):
                cluster.start()
            with connected(cluster):
                for n in (1, 2):
                    if n == 2:
                        with pinned(ALL_CPUS[1:2] if args.pin else ALL_CPUS):
                            cluster.add_node(args.node_cpus)
                    nodes = {"head": cluster.head, **{f"node{i + 1}": x for i, x in enumerate(cluster.nodes)}}
                    s = settings(actors=n * args.actors_per_node, cpus_per_actor=args.cpus_per_actor,
                                 score_batch_size=args.batch_size)
                    results.append(score_once(f"{n} node(s)", s, model_dir, f"{bucket}/archive",
                                              f"{bucket}/scores-{n}nodes", nodes, server))
        finally:
            cluster.stop()
    one, two = results
    print("\nnodes      whole-job img/s  steady img/s  steady img per node-CPU-s")
    for r in results:
        print(f"  {r['label']:9s} {r['job_rate']:8.1f} {r['steady_rate'] or float('nan'):13.1f} {r['steady_per_cpu'] or float('nan'):14.1f}")
    for key, name in (("job_rate", "whole job"), ("steady_rate", "steady")):
        if one[key] and two[key]:
            print(f"per-node scaling, {name}: 2 nodes / (2 x 1 node) = {two[key] / (2 * one[key]):.2f} (target >= 0.9)")
    if one["steady_per_cpu"] and two["steady_per_cpu"]:
        print(f"images per node-CPU-second, 2 nodes / 1 node: {two['steady_per_cpu'] / one['steady_per_cpu']:.2f} "
              "(1.0 = no distribution overhead; less sensitive to other load than images/s)")


def mode_actors(args) -> None:
    from melanoma.config import settings
    from services import RayCluster

    files = source_files(args.images, args.limit)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, s3_with_model(Path(tmp)) as (server, bucket, model_dir):
        upload(files, f"{bucket}/archive")
        cpus = args.max_actors + 1
        print(f"{len(files)} HAM10000 images as loose files; one node of --num-cpus {cpus}, unpinned ({len(ALL_CPUS)} cores)")
        cluster = RayCluster(num_cpus=cpus, token=TOKEN, root_dir=Path(tmp) / "ray")
        results = []
        try:
            cluster.start()
            with connected(cluster):
                for n in range(1, args.max_actors + 1):
                    s = settings(actors=n, cpus_per_actor=1.0, score_batch_size=args.batch_size)
                    results.append(score_once(f"{n} actor(s)", s, model_dir, f"{bucket}/archive",
                                              f"{bucket}/scores-{n}actors", {"head": cluster.head}, server))
        finally:
            cluster.stop()
    base = results[0]
    for r in results:
        n = int(r["label"].split()[0])
        print(f"  {r['label']}: steady {r['steady_rate'] or float('nan'):.1f} img/s, per actor vs 1 actor "
              f"{(r['steady_rate'] or 0) / (n * (base['steady_rate'] or 1)):.2f}; whole job {r['job_rate']:.1f} img/s")


def timed_listing(uri: str, repeats: int) -> tuple[float, int]:
    from melanoma import archive

    best, rows = float("inf"), 0
    for _ in range(repeats):
        started = time.time()
        inputs, _ = archive.list_inputs(uri)
        best = min(best, time.time() - started)
        rows = len(inputs)
    return best, rows


class _CountingRaw(io.RawIOBase):
    """A raw file that counts its reads: under archive's 1 MiB BufferedReader each one is a ranged GET."""

    reads = nbytes = 0

    def __init__(self, raw):
        self._raw = raw

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self._raw.seek(offset, whence)

    def tell(self):
        return self._raw.tell()

    def readinto(self, buffer):
        data = self._raw.read(len(buffer))
        buffer[: len(data)] = data
        _CountingRaw.reads += 1
        _CountingRaw.nbytes += len(data)
        return len(data)


def shard_listing_reads(uri: str) -> tuple[int, int]:
    """(reads, bytes) that archive.list_inputs makes on the tar shards under uri (its io.BufferedReader is wrapped)."""
    import types

    from melanoma import archive

    real = archive.io
    archive.io = types.SimpleNamespace(BufferedReader=lambda raw, size: io.BufferedReader(_CountingRaw(raw), size))
    _CountingRaw.reads = _CountingRaw.nbytes = 0
    try:
        archive.list_inputs(uri)
    finally:
        archive.io = real
    return _CountingRaw.reads, _CountingRaw.nbytes


def mode_archive(args) -> None:
    from melanoma.config import settings
    from services import RayCluster

    files = source_files(args.images, args.limit)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, s3_with_model(Path(tmp)) as (server, bucket, model_dir):
        print(f"building: {len(files)} sources x {args.copies} copies, {args.shard_size} per shard; {load()}")
        stats = build(f"{bucket}/bench", files, args.copies, args.shard_size)
        print_stats(stats)
        print(f"  after build: {load()}")
        print(f"listing (archive.list_inputs, best of {args.repeats}) and fetching (archive.fetch, one input at a "
              f"time; archive.fetch_all, a batch at a time as prepare does):")
        for layout, first in (("loose", "part-00000"), ("shards", "shard-00000.tar")):
            uri, before = stats[layout]["uri"], load()
            seconds_one, rows_one = timed_listing(f"{uri}/{first}", args.repeats)
            seconds, rows = timed_listing(uri, args.repeats)
            print(f"  {layout:6s}: {rows} inputs from {stats[layout]['objects']} objects in {seconds:.2f} s "
                  f"({rows / seconds:.0f} inputs/s); {rows_one} inputs from {first} alone in {seconds_one:.2f} s")
            from melanoma import archive

            if layout == "shards":
                reads, nbytes = shard_listing_reads(uri)
                print(f"    listing the shards read {nbytes / 2**20:.1f} MiB of {stats[layout]['bytes'] / 2**20:.1f} MiB "
                      f"in {reads} reads (ranged GETs), {settings().list_threads} shards at a time")
            else:
                print(f"    (pyarrow lists recursively without a delimiter: {-(-rows // 1000)} ListObjectsV2 pages of <= 1000 keys)")
            sample = archive.list_inputs(uri)[0].head(args.fetches)
            started = time.time()
            for row in sample.itertuples(index=False):
                archive.fetch(row.image_uri, row.shard_uri, row.offset, row.size)
            per = (time.time() - started) / len(sample)
            print(f"    fetch: {per * 1000:.1f} ms per input ({len(sample)} sequential "
                  f"{'GETs' if layout == 'loose' else 'ranged GETs'})")
            threads, reads = settings().fetch_threads, 0
            started = time.time()
            for start in range(0, len(sample), args.batch_size):
                batch = sample.iloc[start : start + args.batch_size].reset_index(drop=True)
                reads += len(archive._spans(batch))
                archive.fetch_all(batch, threads)
            per = (time.time() - started) / len(sample)
            print(f"    fetch_all: {per * 1000:.2f} ms per input (batches of {args.batch_size}, {threads} threads; "
                  f"{reads} reads for {len(sample)} inputs)\n    before: {before}\n    after:  {load()}")
        if args.no_score:
            return
        cluster = RayCluster(num_cpus=args.actors + 1, token=TOKEN, root_dir=Path(tmp) / "ray")
        results = []
        try:
            cluster.start()
            with connected(cluster):
                s = settings(actors=args.actors, cpus_per_actor=1.0, score_batch_size=args.batch_size)
                for layout in ("loose", "shards"):
                    results.append(score_once(layout, s, model_dir, stats[layout]["uri"], f"{bucket}/scores-{layout}",
                                              {"head": cluster.head}, server))
                    print("\n".join(results[-1]["sampler"].report()))
        finally:
            cluster.stop()
    print("\nlayout  images  whole-job img/s  steady img/s  driver peak PSS  largest worker peak PSS")
    for r in results:
        smp = r["sampler"]
        driver = max(v for p, v in smp.peak.items() if smp.where[p] == "driver")
        workers = [v for p, v in smp.peak.items() if smp.where[p] not in ("driver", "seaweedfs")]
        print(f"  {r['label']:6s} {r['rows']:6d} {r['job_rate']:12.1f} {r['steady_rate'] or float('nan'):13.1f} "
              f"{driver / 2**20:12.0f} MiB {max(workers, default=0) / 2**20:12.0f} MiB")


def mode_components(args) -> None:
    import hashlib
    import io

    from PIL import Image

    from melanoma import images
    from melanoma.config import settings

    s = settings()
    sources = source_files(args.images, args.count)
    print(f"one thread, {len(sources)} distinct images per size, {args.rounds} rounds; {load()}")
    print("size        JPEG KiB  decode+resize img/CPU-s  (img/wall-s)  sha256 img/CPU-s")
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        blobs = []
        for f in sources:
            with Image.open(f) as im:
                out = io.BytesIO()
                im.convert("RGB").resize((w, h), Image.Resampling.LANCZOS).save(out, "JPEG", quality=90)
                blobs.append(out.getvalue())
        for b in blobs[:4]:
            images.resize(images.decode(b, s.max_image_pixels, s.max_decoded_side), s.image_size)  # warm up
        before = load(short=True)
        cpu, wall = time.thread_time(), time.time()
        for _ in range(args.rounds):
            for b in blobs:
                images.resize(images.decode(b, s.max_image_pixels, s.max_decoded_side), s.image_size)
        cpu, wall = time.thread_time() - cpu, time.time() - wall
        n = len(blobs) * args.rounds
        hcpu = time.thread_time()
        for _ in range(args.rounds):
            for b in blobs:
                hashlib.sha256(b).hexdigest()
        hcpu = time.thread_time() - hcpu
        print(f"{size:10s} {np.mean([len(b) for b in blobs]) / 1024:8.0f} {n / cpu:16.1f} {n / wall:16.1f} {n / max(hcpu, 1e-9):14.0f}"
              f"   [{before} -> {load(short=True)}]")

    from melanoma import engine, model
    from melanoma.config import CLASS_NAMES

    for size in [int(v) for v in (args.model_sizes or str(s.image_size)).split(",")]:
        net = model.build("default", len(CLASS_NAMES), size)
        predictor = engine.TFLiteEngine(engine.export_tflite(net, size), threads=1)  # what CPU actors run
        print(f"default model at {size}x{size}: {model_flops(net) / 1e9:.3f} GFLOPs per image (multiply-add = 2; conv and dense layers)")
        batch = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3)).astype(np.float32)
        for _ in range(2):
            predictor.predict(batch)  # warm up
        before = load(short=True)
        cpu, wall = time.process_time(), time.time()
        for _ in range(args.batches):
            predictor.predict(batch)
        cpu, wall = time.process_time() - cpu, time.time() - wall
        n = args.batches * args.batch_size
        print(f"inference, default model ({model.DEFAULT_ARCH}, {net.count_params():,} parameters), {size}x{size}, "
              f"batch {args.batch_size}, TF-Lite on 1 thread: {n / cpu:.1f} img/CPU-s ({n / wall:.1f} img/wall-s)   [{before} -> {load(short=True)}]")


def _measured(fn):
    """(fn(), seconds, peak driver PSS while it ran, driver PSS after) with PSS sampled every 0.2 s."""
    with Sampler({}, None, interval=0.2) as sampler:
        started = time.time()
        result = fn()
        seconds = time.time() - started
        time.sleep(0.3)
    return result, seconds, sampler.peak_total, pss(os.getpid())


def _synthetic_partition(root: str, n: int, rows_per_file: int) -> None:
    """n rows of the real output schema in files of rows_per_file under root/run_date=RUN_DATE/."""
    from datetime import datetime, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq

    from melanoma import layout
    from melanoma.config import CLASS_NAMES

    schema = layout.output_schema(list(CLASS_NAMES))
    target = os.path.join(root, f"run_date={RUN_DATE}")
    os.makedirs(target)
    rng = np.random.default_rng(0)
    now = datetime.now(timezone.utc)
    for k, first in enumerate(range(0, n, rows_per_file)):
        m = min(rows_per_file, n - first)
        ids = [f"ISIC_{i:07d}_r{i % 10:02d}" for i in range(first, first + m)]
        probs = rng.dirichlet(np.ones(len(CLASS_NAMES)), m)
        columns = {
            "image_id": ids, "image_uri": [f"s3://bucket/2026-11-25/part-{i // 1000:05d}/{x}.jpg" for i, x in zip(range(first, first + m), ids)],
            "sha256": [f"{i:064x}" for i in range(first, first + m)], "melanoma_risk": probs[:, 3],
            "flagged": probs[:, 3] >= 0.5, "predicted_class": [CLASS_NAMES[j] for j in probs.argmax(1)],
            **{name: probs[:, j] for j, name in enumerate(f.name for f in schema if f.name.startswith("p_"))},
            "model_version": ["v"] * m, "scored_at": [now] * m, "error": [None] * m,
            **{name: [None] * m for name in layout.IMAGE_STATS},
        }
        pq.write_table(pa.table(columns, schema=schema), os.path.join(target, f"part-{k:05d}.parquet"))


def mode_listing(args) -> None:
    from datetime import datetime, timezone

    import pyarrow.fs as pafs

    from melanoma import archive, commit, layout, storage

    n = args.rows
    print(f"driver-side costs for {n:,} inputs (this process alone; PSS sampled every 0.2 s)")

    def fake_list_files(uri, suffixes=None):
        return [pafs.FileInfo(f"bucket/2026-11-25/part-{i // 1000:05d}/ISIC_{i:07d}_r{i % 10:02d}.jpg",
                              type=pafs.FileType.File, size=5400) for i in range(n)]

    before, base = load(), pss(os.getpid())
    real = archive.storage.list_files
    archive.storage.list_files = fake_list_files  # the real list_inputs code, over n keys, without the S3 calls
    try:
        (inputs, _), listed, peak, held = _measured(lambda: archive.list_inputs("s3://bucket/2026-11-25"))
    finally:
        archive.storage.list_files = real
    print(f"  list_inputs, {n:,} keys (no I/O): {listed:.1f} s, driver PSS {base / 2**20:.0f} MiB before, peak "
          f"{peak / 2**20:.0f} MiB, {held / 2**20:.0f} MiB holding the frame ({(held - base) / n:.0f} B/input; "
          f"pandas deep size {inputs.memory_usage(deep=True).sum() / n:.0f} B/input)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.parquet")
        _, written, peak, _ = _measured(lambda: storage.write_parquet(path, inputs))
        print(f"  inputs.parquet: {os.path.getsize(path) / 2**20:.1f} MiB, written in {written:.1f} s, peak PSS {peak / 2**20:.0f} MiB")
    print(f"  before: {before}\n  after:  {load()}")

    before = load()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.time()
        _synthetic_partition(tmp, n, 5000)
        print(f"  a partition of {n:,} synthetic output rows in 5,000-row files written in {time.time() - started:.1f} s")
        del inputs
        base = pss(os.getpid())
        done, seconds, peak, held = _measured(lambda: commit.already_scored(layout.night(tmp, RUN_DATE)))
        print(f"  already_scored (rerun of a night with {n:,} rows): {seconds:.1f} s, PSS peak +{(peak - base) / 2**20:.0f} MiB, "
              f"set held +{(held - base) / 2**20:.0f} MiB")
        del done
        base = pss(os.getpid())
        _, seconds, peak, _ = _measured(lambda: commit._counts(layout.night(tmp, RUN_DATE), datetime.now(timezone.utc)))
        print(f"  the summary's counts over {n:,} rows: {seconds:.1f} s, PSS peak +{(peak - base) / 2**20:.0f} MiB")
    print(f"  before: {before}\n  after:  {load()}")


def _pairs(text: str) -> dict[str, float]:
    return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}


def mode_capacity(args) -> None:
    """The capacity model of docs/capacity.md, from per-image costs (defaults: the figures measured there)."""
    decode = _pairs(args.decode_ms)
    window = args.window_hours * 3600 - args.startup_s
    prices = _pairs(args.prices)
    head = prices.pop("head", 0.0)
    print(f"window {args.window_hours} h minus {args.startup_s:.0f} s start-up; inference {args.infer_ms} ms/img/vCPU (CPU nodes), "
          f"other work {args.overhead_ms} ms, unhidden GET wait {args.latency_ms} ms per image, per-node efficiency "
          f"{args.efficiency}, SMT factor {args.smt}; {args.requests_per_image:g} S3 requests/image at ${args.get_price}/1000; "
          f"head ${head}/h; EXAMPLE prices {args.prices}")
    nodes = {
        # name: (usable vCPU threads, does the CPU run inference?)
        "c7i.4xlarge": (args.c7i_vcpus - 1, True),  # 1 vCPU left for Ray Data's read/write tasks
        "g5.xlarge": (args.g5_vcpus - 1, False),  # 1 vCPU feeds the GPU actor; inference on the GPU
    }
    print("\ninstance      input       img/s/node  M/window  10^4: nodes, h   10^5: nodes, h   10^6: nodes, h   $ per 10^6 images: nodes+head + GETs")
    for name, (threads, cpu_inference) in nodes.items():
        if name not in prices:
            continue
        for size, d in decode.items():
            cpu_ms = d + args.overhead_ms + (args.infer_ms if cpu_inference else 0.0)
            # One image at a time per worker (prepare fetches serially): CPU time slowed by SMT, plus the GET wait.
            rate = threads * 1000.0 / (cpu_ms / args.smt + args.latency_ms) * args.efficiency
            if not cpu_inference:
                rate = min(rate, args.gpu_img_s)
            cells = []
            for n_images in (1e4, 1e5, 1e6):
                n = max(1, int(np.ceil(n_images / (rate * window))))
                hours = (args.startup_s + n_images / (n * rate)) / 3600
                cells.append(f"{n:5d}, {hours:5.2f}")
            # $ for one night of 10^6 images on the nodes above (start-up included) + the head node, + one GET per image
            compute = (n * prices[name] + head) * hours
            gets = 1e6 * args.requests_per_image / 1000 * args.get_price
            print(f"{name:13s} {size:10s} {rate:10.0f} {rate * window / 1e6:9.1f}   " + "   ".join(cells)
                  + f"     {compute:6.2f} + {gets:.2f} = {compute + gets:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("components", "nodes", "actors", "archive", "listing", "capacity"))
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="source JPEGs (HAM10000)")
    parser.add_argument("--limit", type=int, default=1000, help="source images to use (0: all 10,015)")
    parser.add_argument("--batch-size", type=int, default=32, help="score_batch_size (rows per prepare/Scorer batch)")
    parser.add_argument("--node-cpus", type=int, default=2, help="nodes: --num-cpus of each (one-core) node")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="nodes: logical CPUs per Scorer actor")
    parser.add_argument("--actors-per-node", type=int, default=1, help="nodes: Scorer actors per node")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="nodes: do not pin each node to a core")
    parser.add_argument("--max-actors", type=int, default=2, help="actors: try 1..N actors")
    parser.add_argument("--actors", type=int, default=1, help="archive: Scorer actors (1 CPU each)")
    parser.add_argument("--copies", type=int, default=2, help="archive: re-keyed copies of every source image")
    parser.add_argument("--shard-size", type=int, default=1000, help="archive: images per tar shard")
    parser.add_argument("--repeats", type=int, default=3, help="archive: listing repeats (best is printed)")
    parser.add_argument("--no-score", action="store_true", help="archive: build and time listing only")
    parser.add_argument("--fetches", type=int, default=200, help="archive: inputs fetched one by one for the GET latency")
    parser.add_argument("--count", type=int, default=64, help="components: distinct images per size")
    parser.add_argument("--rounds", type=int, default=3, help="components: passes over them")
    parser.add_argument("--sizes", default="200x150,180x180,600x450,1024x768", help="components: WxH list")
    parser.add_argument("--batches", type=int, default=10, help="components: timed inference batches")
    parser.add_argument("--model-sizes", default="", help="components: model input sizes (default: Settings.image_size)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="listing: synthetic inputs")
    parser.add_argument("--decode-ms", default="200x150=0.54,600x450=3.61,1024x768=11.96,4000x3000=51.3",
                        help="capacity: decode+resize CPU ms per image by input size (measured: components)")
    parser.add_argument("--infer-ms", type=float, default=2.32, help="capacity: inference CPU ms per image (measured)")
    parser.add_argument("--overhead-ms", type=float, default=2.21, help="capacity: other CPU ms per image (measured)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="capacity: GET wait per image not hidden by other work")
    parser.add_argument("--efficiency", type=float, default=0.95, help="capacity: throughput kept per added node (measured 2 nodes)")
    parser.add_argument("--smt", type=float, default=0.6, help="capacity: per-vCPU speed when both hyperthreads are busy (assumed)")
    parser.add_argument("--startup-s", type=float, default=600, help="capacity: cluster + job start-up seconds (assumed)")
    parser.add_argument("--window-hours", type=float, default=4.0)
    parser.add_argument("--c7i-vcpus", type=int, default=16)
    parser.add_argument("--g5-vcpus", type=int, default=4)
    parser.add_argument("--gpu-img-s", type=float, default=10000, help="capacity: GPU inference img/s (assumed, not measured)")
    parser.add_argument("--prices", default="c7i.4xlarge=0.714,g5.xlarge=1.006,head=0.2016",
                        help="capacity: $/hour per instance type, EXAMPLE prices; head = the CPU-0 head node")
    parser.add_argument("--get-price", type=float, default=0.0004, help="capacity: $ per 1,000 S3 GET/HEAD requests (example)")
    parser.add_argument("--requests-per-image", type=float, default=2,
                        help="capacity: GET-class requests per image (pyarrow: a HEAD, then the GET)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per scoring run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    TIMEOUT[0] = args.timeout
    signal.signal(signal.SIGALRM, _raise_timeout)
    # `timeout`/kill: exit through the finally blocks, which stop the Ray nodes and SeaweedFS started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] scaling.py {' '.join(sys.argv[1:])}; {load()}")
    {"components": mode_components, "nodes": mode_nodes, "actors": mode_actors, "archive": mode_archive,
     "listing": mode_listing, "capacity": mode_capacity}[args.mode](args)
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] done; {load()}")


if __name__ == "__main__":
    main()
