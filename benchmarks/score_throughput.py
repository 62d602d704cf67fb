"""Scoring speed and memory of the default model on the real HAM10000 archive (10,015 JPEGs, 200x150).

    python benchmarks/score_throughput.py [--limit N] [--repeat 4] [--actors 2] [--arch default]

1. Engines: images/s of the model alone (pixels already decoded, batches of 64) through Keras
   `predict_on_batch`, its TF-Lite float32 export and an int8 export, each on 1 thread and on every core,
   each in a fresh process; beside them the arithmetic limit: the model's FLOPs per image over the cores'
   measured float32 matrix-multiply peak.
2. The plain loop: the job's work without Ray. One fresh process lists the local archive, loads the model from
   the registry and runs the job's own per-batch code (melanoma/scorer.py: read, sha256, decode, resize, drift
   statistics, the engine on every core, output rows) batch after batch, writing the rows to one Parquet file;
   timed from launch to exit (it pays its own start-up, as a job does). Beside it the bare loop: read, decode,
   resize and the engine only.
3. `melanoma score` on a local Ray (the engine the CLI picks: the TF-Lite export on CPU), whole job timed:
   from local disk, from tar shards of 1,000 on a local SeaweedFS, and as loose files on it; each against the
   plain loop. The S3 server shares these 2 cores: its share of the busy CPU is printed.
4. Start-up: the wall time of a run of one batch. Memory: peak PSS of the job (driver and every Ray process, not
   the S3 server), sampled on the loose-file runs only: the archive once and --repeat copies under other keys;
   streaming keeps them alike.

The model is the default architecture with its ImageNet backbone and an untrained head: speed does not depend
on the head's weights. The int8 export's quality is measured by benchmarks/quality.py (`--engine tflite-int8`).
The last line is one JSON line of every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

BATCH = 64


def publish_untrained(model_dir: str, arch: str = "default") -> None:
    """The model as `melanoma train` publishes it (Keras file and TF-Lite export), with an untrained head."""
    from melanoma import engine, model, registry
    from melanoma.config import CLASS_NAMES, settings

    s = settings()
    net = model.build(arch, len(CLASS_NAMES), s.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        net.save(path)
        card = {"version": "bench-untrained", "arch": arch, "class_names": list(CLASS_NAMES),
                "positive_class": "melanoma", "input_size": [s.image_size, s.image_size, 3],
                "temperature": 1.0, "alert_threshold": 0.5}  # fmt: skip
        registry.publish(model_dir, path, card, {engine.TFLITE_FILE: engine.export_tflite(net, s.image_size)})


def decoded(files: list[Path], size: int) -> np.ndarray:
    from melanoma import images
    from melanoma.config import settings

    s = settings()
    return np.stack([images.resize(images.decode(f.read_bytes(), s.max_image_pixels, s.max_decoded_side), size) for f in files])


# ---------------------------------------------------------------- run in fresh processes


def child_engine(model_dir: str, name: str, threads: int, images: str, n: int) -> dict:
    """images/s of one engine on n decoded images (after one warm-up batch)."""
    from melanoma import engine

    if name == "tflite-int8":
        predictor = engine.TFLiteEngine(Path(model_dir, "int8.tflite").read_bytes(), threads)
    else:
        predictor = engine.load(model_dir, name, threads)[0]
    pixels = np.load(images)[:n].astype(np.float32)
    predictor.predict(pixels[:BATCH])
    started = time.perf_counter()
    for i in range(0, len(pixels), BATCH):
        predictor.predict(pixels[i : i + BATCH])
    return {"img_s": len(pixels) / (time.perf_counter() - started)}


class NoBar:
    """The plain loop draws no bar."""

    def add(self, n: int, line: str | None = None) -> None:
        pass


def child_plain(model_dir: str, archive_dir: str, out: str) -> dict:
    """The plain loop: the job's own per-batch code (melanoma/scorer.py: read, sha256, decode, resize, drift
    statistics, the engine on every core, output rows), one batch after another in this process, the rows written
    to one Parquet file. It lists the archive and loads the model itself, as the job does."""
    import pyarrow.parquet as pq

    from melanoma import archive, engine, layout, scorer
    from melanoma.config import settings

    s = settings()
    version_dir, card, _ = engine.check(model_dir, "auto")
    rows, _ = archive.list_inputs(archive_dir)
    score = scorer.Scorer(version_dir, "auto", os.cpu_count(), False, NoBar())
    size = card["input_size"][0]
    started = time.perf_counter()
    with pq.ParquetWriter(out, layout.output_schema(card["class_names"])) as writer:
        for i in range(0, len(rows), BATCH):
            batch = scorer.prepare(rows.iloc[i : i + BATCH], size, s.max_image_pixels, s.max_decoded_side, s.fetch_threads)
            writer.write_table(score(batch))
    return {"steady_img_s": len(rows) / (time.perf_counter() - started), "engine": score.loaded[0].name}


def child_bare(model_dir: str, listing: str) -> dict:
    """The bare loop: read, decode, resize and score every listed file with the engine scoring uses; no digest,
    no drift statistics, no output rows."""
    from melanoma import engine, images
    from melanoma.config import settings

    s = settings()
    predictor, card, _ = engine.load(model_dir, "auto", os.cpu_count())
    size = card["input_size"][0]
    files = Path(listing).read_text().split("\n")
    started = time.perf_counter()
    for i in range(0, len(files), BATCH):
        pixels = [images.resize(images.decode(Path(f).read_bytes(), s.max_image_pixels, s.max_decoded_side), size) for f in files[i : i + BATCH]]
        predictor.predict(np.stack(pixels))
    return {"steady_img_s": len(files) / (time.perf_counter() - started), "engine": predictor.name}


def child_peak_gflops(threads: int) -> dict:
    """float32 matrix-multiply GFLOP/s on `threads` cores (OpenBLAS threads set before numpy loads)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    started, reps = time.perf_counter(), 6
    for _ in range(reps):
        a @ a
    return {"gflops": reps * 2 * 2048**3 / (time.perf_counter() - started) / 1e9}


def in_fresh_process(*args: str, threads: int | None = None) -> tuple[dict, float]:
    """(the child's JSON result with its CPU-seconds as "cpu_s", wall seconds from launch to exit)."""
    env = dict(os.environ)
    if threads is not None:
        env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result, time.perf_counter() - started


# ---------------------------------------------------------------- measurements


def model_flops(net) -> float:
    """Multiply-adds x 2 of one image through the convolutions and dense layers (the rest is small)."""
    import keras

    total = 0
    for layer in net.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            h, w, c = layer.output.shape[1:]
            total += h * w * c * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, keras.layers.SeparableConv2D):
            h, w, out = layer.output.shape[1:]
            c = layer.input.shape[-1]
            total += h * w * c * (layer.kernel_size[0] * layer.kernel_size[1] + out)
        elif isinstance(layer, keras.layers.Conv2D):
            h, w, out = layer.output.shape[1:]
            total += h * w * out * layer.input.shape[-1] * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return 2.0 * total


def engines(model_dir: str, files: list[Path], work: Path) -> dict:
    from melanoma import engine, registry
    from melanoma.config import settings

    size = settings().image_size
    sample = files[: min(len(files), 1024)]
    pixels = decoded(sample, size)
    np.save(work / "pixels.npy", pixels)
    calibration = pixels[np.random.default_rng(0).permutation(len(pixels))[:256]]
    (Path(model_dir) / "int8.tflite").write_bytes(engine.export_tflite(registry.load(model_dir).model, size, calibration))
    out: dict = {}
    cores = os.cpu_count()
    for name in ("keras", "tflite", "tflite-int8"):
        for threads in sorted({1, cores}):
            result, _ = in_fresh_process("engine", model_dir, name, str(threads), str(work / "pixels.npy"), str(len(pixels)))
            out[f"engine_{name}_{threads}thread_img_s"] = round(result["img_s"], 1)
    flops = model_flops(registry.load(model_dir).model)
    out["model_gflops_per_image"] = round(flops / 1e9, 3)
    for threads in sorted({1, cores}):
        peak = in_fresh_process("peak", str(threads), threads=threads)[0]["gflops"]
        out[f"peak_gflops_{threads}thread"] = round(peak, 1)
        out[f"arithmetic_limit_{threads}thread_img_s"] = round(peak * 1e9 / flops, 1)
    return out


def plain_loops(model_dir: str, local: Path, files: list[Path], work: Path) -> dict:
    """The plain loop (the job's work without Ray) and the bare loop, each timed from launch to exit."""
    out = {}
    result, wall = in_fresh_process("plain", model_dir, str(local), str(work / "plain.parquet"))
    out |= {"plain_img_s": round(len(files) / wall, 1), "plain_steady_img_s": round(result["steady_img_s"], 1),
            "plain_startup_s": round(wall - len(files) / result["steady_img_s"], 1), "plain_engine": result["engine"],
            "plain_cpu_s": round(result["cpu_s"], 1)}  # fmt: skip
    listing = work / "files.txt"
    listing.write_text("\n".join(str(f) for f in files))
    result, wall = in_fresh_process("bare", model_dir, str(listing))
    out |= {"bare_loop_img_s": round(len(files) / wall, 1), "bare_loop_steady_img_s": round(result["steady_img_s"], 1)}
    return out


def descendants(root: int, exclude: int | None = None) -> list[int]:
    """`root` and all its descendants but `exclude`'s subtree."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid != exclude:
            found.append(pid)
            stack.extend(children.get(pid, []))
    return found


def process_tree_pss(root: int, exclude: int | None = None) -> int:
    """PSS in bytes of `root` and all its descendants but `exclude`'s subtree (PSS splits shared pages, so the
    object store counts once)."""
    total = 0
    for pid in descendants(root, exclude):
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


class CpuByRole:
    """CPU-seconds of the job's processes while it runs, by role: the scoring actors (Ray Data's MapWorkers), this
    process (the driver; the memory sampler's own CPU is taken off by the caller), and every other Ray process
    (raylet, GCS, agents, the progress queue, read and write tasks); the S3 server apart. Sampled every half
    second from /proc/<pid>/stat (cheap), so a process that ends loses at most its last half second."""

    def __init__(self, exclude: int | None):
        self.exclude = exclude
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, tuple[str, float]]:
        seen = {}
        for pid in descendants(os.getpid(), self.exclude):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
                role = "driver" if pid == os.getpid() else "actors" if b"MapWorker" in command else "ray_other"
                if self.last.get(pid, ("",))[0] == "actors":
                    role = "actors"  # a worker keeps the role it was once seen in
                seen[pid] = (role, cpu_seconds(pid))
            except OSError:
                pass
        return seen

    def _run(self):
        while not self._stop.is_set():
            self.last.update(self._sample())
            time.sleep(0.5)

    def __enter__(self):
        self.first = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.last.update(self._sample())

    def seconds(self) -> dict[str, float]:
        out = {"actors": 0.0, "driver": 0.0, "ray_other": 0.0}
        for pid, (role, cpu) in self.last.items():
            out[role] += cpu - self.first.get(pid, (role, 0.0))[1]
        return {role: round(value, 1) for role, value in out.items()}


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine spent not idle, summed over cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class PeakMemory:
    """Peak PSS of this process and its descendants (Ray's processes) but the S3 server, sampled once a second.
    Reading every process's smaps_rollup is not free (8% of these 2 cores at twice a second): `cpu_seconds` says
    what the sampling cost."""

    def __init__(self, exclude: int | None):
        self.peak = 0
        self.cpu_seconds = 0.0
        self.exclude = exclude
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            started = time.thread_time()
            self.peak = max(self.peak, process_tree_pss(os.getpid(), self.exclude))
            self.cpu_seconds += time.thread_time() - started
            time.sleep(1.0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def upload(files: list[Path], prefix: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from melanoma import storage

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: storage.write_bytes(f"{prefix}/{f.name}", f.read_bytes()), files))


def jobs(model_dir: str, files: list[Path], bucket: str, server, tmp: Path, args) -> dict:
    """The scoring job from each layout, the start-up of a one-batch run, and peak memory at 1x and --repeat x."""
    import ray

    from melanoma import score
    from melanoma.config import settings

    for copy in range(args.repeat):
        upload(files, f"{bucket}/archive/copy-{copy}")
    build(f"{bucket}/tar", files, copies=1, layouts=("shards",))
    local = tmp / "local"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    s = settings(actors=args.actors, score_batch_size=BATCH)
    upload(files[:BATCH], f"{bucket}/one-batch")
    started = time.perf_counter()
    score.score(s, model_dir, f"{bucket}/one-batch", f"{bucket}/scores-one-batch", "2026-11-25")
    out: dict = {"startup_s": round(time.perf_counter() - started, 1)}
    small, large = (f"{len(files) * k / 1000:g}k" for k in (1, args.repeat))
    runs = (("local", str(local)), ("tar", f"{bucket}/tar/shards"), ("s3", f"{bucket}/archive/copy-0"),
            (f"s3_{large}", f"{bucket}/archive"))  # fmt: skip
    for label, prefix in runs:
        server_cpu, busy = cpu_seconds(server.pid), machine_busy_seconds()
        # memory is sampled on the loose-file runs only, so that the sampling does not slow the runs compared
        # with the plain loop from local disk and tar shards
        with (
            PeakMemory(exclude=server.pid) if label.startswith("s3") else contextlib.nullcontext() as memory,
            CpuByRole(exclude=server.pid) as cpu,
        ):
            started = time.perf_counter()
            summary = score.score(s, model_dir, prefix, f"{bucket}/scores-{label}", "2026-11-25")
            seconds = time.perf_counter() - started
        out[f"job_{label}_img_s"] = round(summary["rows"] / seconds, 1)
        out[f"job_{label}_rows"] = summary["rows"]
        out |= {f"job_{label}_cpu_s_{role}": value for role, value in cpu.seconds().items()}
        if memory is not None:  # the memory sampler runs in this process: not the driver's work
            out[f"job_{label}_cpu_s_driver"] = round(out[f"job_{label}_cpu_s_driver"] - memory.cpu_seconds, 1)
        out[f"job_{label}_machine_busy_s"] = round(machine_busy_seconds() - busy, 1)
        out[f"job_{label}_s3_server_cpu_share"] = round((cpu_seconds(server.pid) - server_cpu) / max(machine_busy_seconds() - busy, 1e-9), 2)
        if memory is not None:
            out[f"peak_memory_{label}_gib"] = round(memory.peak / 2**30, 2)
            out[f"memory_sampling_{label}_cpu_s"] = round(memory.cpu_seconds, 1)
        out["job_engine"] = summary["engine"]
    ray.shutdown()
    out[f"peak_memory_{small}_gib"] = out.pop("peak_memory_s3_gib")
    out[f"peak_memory_{large}_gib"] = out.pop(f"peak_memory_s3_{large}_gib")
    out[f"memory_ratio_{large}_vs_{small}"] = round(out[f"peak_memory_{large}_gib"] / out[f"peak_memory_{small}_gib"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/ham10000/images"))
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the archive for the memory run")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--arch", default="default", help="architecture (melanoma/model.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from melanoma.local import SeaweedServer

    files = sorted(Path(args.images).glob("*.jpg"))
    files = files[: args.limit] if args.limit else files
    figures: dict = {"images": len(files), "arch": args.arch, "cores": os.cpu_count(), "load_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(Path(tmp) / "s3") as server:
        os.environ.update(server.env())
        tmp = Path(tmp)
        model_dir = str(tmp / "models" / "bench-untrained")
        publish_untrained(str(tmp / "models"), args.arch)
        figures |= engines(model_dir, files, tmp)
        local = tmp / "local"
        local.mkdir()
        for f in files:
            (local / f.name).symlink_to(f.resolve())
        figures |= plain_loops(model_dir, local, files, tmp)
        bucket = server.make_bucket("bench")
        figures |= jobs(model_dir, files, bucket, server, tmp, args)
    plain = figures["plain_img_s"]
    figures |= {
        "ratio_local_vs_plain": round(figures["job_local_img_s"] / plain, 2),
        "ratio_tar_vs_plain": round(figures["job_tar_img_s"] / plain, 2),
        "ratio_s3_vs_plain": round(figures["job_s3_img_s"] / plain, 2),
        "ratio_local_vs_bare_loop": round(figures["job_local_img_s"] / figures["bare_loop_img_s"], 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    for key, value in figures.items():
        print(f"{key:45s} {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        logging.disable(logging.WARNING)
        if kind == "engine":
            result = child_engine(rest[0], rest[1], int(rest[2]), rest[3], int(rest[4]))
        elif kind == "plain":
            result = child_plain(*rest)
        elif kind == "bare":
            result = child_bare(*rest)
        else:
            result = child_peak_gflops(int(rest[0]))
        print(json.dumps(result))
    else:
        main()
