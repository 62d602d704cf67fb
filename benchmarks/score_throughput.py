"""Scoring throughput and memory on the real HAM10000 archive (10,015 JPEGs, 200x150).

    python benchmarks/score_throughput.py [--images ../shared/data/ham10000/images] [--actors 2] [--repeat 4]

(a) a plain single-process loop over the local files: read, decode, resize, `predict_on_batch`;
(b) `melanoma score` from a local SeaweedFS S3 server on a local Ray, the whole job (listing, start-up,
    writing) timed end to end.
Prints images/s of each and the ratio b/a (target >= 0.9), then the peak memory (PSS, summed over the
driver and every Ray process it started, not the S3 server) of the scoring job on the archive once (10k)
and `--repeat` times under other keys (40k); streaming means the two should be within 1.1x. Also printed:
(c) the same pipeline reading the same files from local disk, and the S3 server's share of the machine's
CPU during (b): both say how much of the gap between (a) and (b) is the storage server sharing the cores;
(b') the same images uploaded as tar shards of 1,000, which cost the server one ranged read per batch;
(d) the CPU that reading the images from S3 costs (client and server), and the best b it leaves on these cores;
(e) the wall time of a one-batch run: the start-up every run pays.

The model is the default architecture (or --arch), untrained: throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from make_archive import build


def publish_untrained(model_dir: str, arch: str = "default") -> None:
    from melanoma import model, registry
    from melanoma.config import CLASS_NAMES, settings

    s = settings()
    net = model.build(arch, len(CLASS_NAMES), s.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        net.save(path)
        card = {"version": "bench-untrained", "arch": arch, "class_names": list(CLASS_NAMES),
                "positive_class": "melanoma", "input_size": [s.image_size, s.image_size, 3],
                "temperature": 1.0, "alert_threshold": 0.5}
        registry.publish(model_dir, path, card)


def upload(files: list[Path], prefix: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from melanoma import storage

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: storage.write_bytes(f"{prefix}/{f.name}", f.read_bytes()), files))


def own_cpu_seconds() -> float:
    """CPU-seconds of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plain_loop(files: list[Path], model_dir: str, batch: int) -> tuple[float, float]:
    """(images/s, CPU-seconds per image)."""
    from melanoma import images, registry
    from melanoma.config import settings

    s = settings()  # TensorFlow's default threading: every core of the machine
    net = registry.load(model_dir).model
    started, cpu = time.time(), own_cpu_seconds()
    for i in range(0, len(files), batch):
        pixels = [images.resize(images.decode(f.read_bytes(), s.max_image_pixels, s.max_decoded_side), s.image_size) for f in files[i : i + batch]]
        net.predict_on_batch(np.stack(pixels).astype(np.float32))
    return len(files) / (time.time() - started), (own_cpu_seconds() - cpu) / len(files)


def fetch_cpu_seconds(prefix: str, batch: int, server_pid: int) -> tuple[float, float]:
    """(client, S3 server) CPU-seconds per image of reading every image under prefix the way `prepare` does:
    work the plain loop does not have, done on the same cores here."""
    from melanoma import archive
    from melanoma.config import settings

    rows, _ = archive.list_inputs(prefix)
    threads = settings().fetch_threads
    client, server = own_cpu_seconds(), cpu_seconds(server_pid)
    for i in range(0, len(rows), batch):
        archive.fetch_all(rows.iloc[i : i + batch], threads)
    return (own_cpu_seconds() - client) / len(rows), (cpu_seconds(server_pid) - server) / len(rows)


def cold_start_seconds(model_dir: str) -> float:
    """What the plain loop's timing leaves out: a fresh process importing TensorFlow and loading the model."""
    code = f"from melanoma import registry; registry.load({model_dir!r})"
    started = time.time()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.time() - started


def process_tree_pss(root: int, exclude: int | None = None) -> int:
    """PSS in bytes of `root` and all its descendants but `exclude`'s subtree (PSS splits shared pages, so the
    object store counts once)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        if pid == exclude:
            continue
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine spent not idle, summed over cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class PeakMemory:
    """Peak PSS of this process and its descendants (Ray's processes) but the S3 server, sampled twice a second."""

    def __init__(self, exclude: int | None):
        self.peak = 0
        self.exclude = exclude
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, process_tree_pss(os.getpid(), self.exclude))
            time.sleep(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/ham10000/images"))
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--arch", default="default", help="architecture of the untrained model (melanoma/model.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from melanoma import score, storage
    from melanoma.config import settings
    from melanoma.local import SeaweedServer

    files = sorted(Path(args.images).glob("*.jpg"))
    files = files[: args.limit] if args.limit else files
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(Path(tmp) / "s3") as server:
        os.environ.update(server.env())
        bucket = server.make_bucket("bench")
        model_dir = f"{bucket}/models"
        publish_untrained(model_dir, args.arch)
        # (a) runs before the uploads (the S3 server keeps working for a while after 50k PUTs) and again after
        # the scoring runs; the faster of the two is the reference, so machine noise cannot flatter the ratios
        first, plain_cpu = plain_loop(files, model_dir, args.batch_size)
        for copy in range(args.repeat):
            upload(files, f"{bucket}/archive/copy-{copy}")
        build(f"{bucket}/tar", files, copies=1, layouts=("shards",))
        print(f"{len(files)} images uploaded {args.repeat} times under other keys, and once as tar shards of 1,000")
        cold = cold_start_seconds(model_dir)

        client, served = fetch_cpu_seconds(f"{bucket}/archive/copy-0", args.batch_size, server.pid)
        cores = os.cpu_count()
        best = cores / (plain_cpu + client + served)  # images/s if every core did only the plain loop's work and the reads

        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        s = settings(actors=args.actors, score_batch_size=args.batch_size)
        upload(files[: args.batch_size], f"{bucket}/one-batch")
        started = time.time()
        score.score(s, model_dir, f"{bucket}/one-batch", f"{bucket}/scores-one-batch", "2026-11-25")
        startup = time.time() - started
        results = {}
        local = Path(tmp) / "local"  # the same images as (a), read by the pipeline from local disk
        local.mkdir()
        for f in files:
            (local / f.name).symlink_to(f.resolve())
        runs = (("10k", f"{bucket}/archive/copy-0"), (f"{len(files) * args.repeat // 1000}k", f"{bucket}/archive"),
                ("local", str(local)), ("shards", f"{bucket}/tar/shards"))
        for label, prefix in runs:
            server_cpu, busy = cpu_seconds(server.pid), machine_busy_seconds()
            with PeakMemory(exclude=server.pid) as memory:
                started = time.time()
                summary = score.score(s, model_dir, prefix, f"{bucket}/scores-{label}", "2026-11-25")
                seconds = time.time() - started
            share = (cpu_seconds(server.pid) - server_cpu) / max(machine_busy_seconds() - busy, 1e-9)
            results[label] = (summary["rows"], summary["rows"] / seconds, memory.peak, share)
        ray.shutdown()
        last, _ = plain_loop(files, model_dir, args.batch_size)
    plain = max(first, last)
    print(f"(a) plain loop, local files, 1 process : {plain:7.1f} img/s (TensorFlow imported, model loaded; the faster "
          f"of {first:.1f} before and {last:.1f} after the scoring runs; {plain_cpu * 1000:.2f} ms of CPU per image)")
    plain_cold = len(files) / (len(files) / plain + cold)
    print(f"(a') the same counting its own start-up  : {plain_cold:7.1f} img/s (a fresh process imports TensorFlow "
          f"and loads the model in {cold:.1f} s; the scoring job's times include that)")
    print(f"(d) reading the images from S3 costs {(client + served) * 1000:.2f} ms of CPU per image (client "
          f"{client * 1000:.2f}, S3 server {served * 1000:.2f}) on the same {cores} cores: with nothing else "
          f"added and every core busy, b could reach at most {best:.1f} img/s, b/a {best / plain:.2f}")
    print(f"(e) a run of one batch ({args.batch_size} images) takes {startup:.1f} s: the start-up every run pays "
          f"(planning, {args.actors} actors importing TensorFlow and loading the model, commit)")
    rows, rate, _, share = results["10k"]
    print(f"(b) melanoma score from S3, {args.actors} actors  : {rate:7.1f} img/s ({rows} rows, whole job; "
          f"the S3 server used {share:.0%} of the machine's busy CPU)")
    print(f"ratio b/a: {rate / plain:.2f} (target >= 0.9); b/a': {rate / plain_cold:.2f}")
    rows, rate, _, share = results.pop("shards")
    print(f"(b') the same images as tar shards on S3: {rate:7.1f} img/s ({rows} rows, whole job; S3 server "
          f"{share:.0%} of the busy CPU); ratio b'/a: {rate / plain:.2f}, b'/a': {rate / plain_cold:.2f}")
    rows, rate, _, _ = results.pop("local")
    print(f"(c) melanoma score from local disk     : {rate:7.1f} img/s ({rows} rows, whole job); ratio c/a: {rate / plain:.2f}, "
          f"c/a': {rate / plain_cold:.2f}")
    for label, (rows, rate, peak, _) in results.items():
        print(f"peak memory of the scoring job (driver + Ray, not the S3 server), {rows} images: {peak / 2**30:.2f} GiB "
              f"({rate:.1f} img/s)")
    small, large = (results[k][2] for k in results)
    print(f"memory ratio large/small: {large / small:.2f} (target <= 1.1)")


if __name__ == "__main__":
    main()
