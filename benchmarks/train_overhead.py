"""Epoch time of Ray Train (1 and 2 workers) against a plain single-process Keras `fit` on the same images,
the same model and the same total CPUs, for the default recipe (the pretrained EfficientNet-Lite0) and the
best from-scratch one (residual-sep-v2). Target: ratio ray/plain <= 1.15 with 2 workers.

    python benchmarks/train_overhead.py [--per-class 60] [--epochs 4] [--recipes default,residual-sep-v2] [--workers 1,2]

Both sides train every training image once per epoch in batches of 32 (Ray: a shuffle drawn by each worker from
the shard it read once; no blur augmentation, which the plain loop does not have). Ray's figure is the training
phase of each epoch as the workers report it (validation and checkpoints come after it); the first epoch of each
(graph tracing) is left out of the means, and `steady` is the slowest later epoch over the fastest (the data feed
no longer stalls: within 1.10). The last line is one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def subset(data: Path, per_class: int, out: Path) -> Path:
    """A class-folder subset made of links to the real files."""
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        (out / folder.name).mkdir(parents=True)
        for f in sorted(folder.glob("*.jpg"))[:per_class]:
            (out / folder.name / f.name).symlink_to(f.resolve())
    return out


def plain_fit(work: str, arch: str, epochs: int, threads: int) -> list[float]:
    """Seconds of each epoch of `fit`, in this (fresh) process with TensorFlow on `threads` threads."""
    import keras
    import tensorflow as tf

    from melanoma import model, train
    from melanoma.config import CLASS_NAMES, settings

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    s = settings(arch=arch)
    rows, _ = train.training_tables(work)
    batch = train.load_images(rows, s.image_size, s.max_image_pixels, s.max_decoded_side)
    net = model.build(arch, len(CLASS_NAMES), s.image_size)
    net.compile(optimizer=keras.optimizers.Adam(s.learning_rate), loss="sparse_categorical_crossentropy")
    times = []
    for _ in range(epochs):
        started = time.time()
        net.fit(batch["image"].astype(np.float32), batch["label"], batch_size=32, epochs=1, verbose=0, shuffle=True)
        times.append(time.time() - started)
    return times


def ray_fit(work: str, models: str, arch: str, epochs: int, workers: int, n_train: int) -> list[float]:
    from melanoma import train
    from melanoma.config import settings

    s = settings(arch=arch, workers=workers, epochs=epochs, patience=epochs, batch_size=32, epoch_images=n_train,
                 balance_power=0.0, lowres_share=0.0)  # fmt: skip
    card = train.train(s, work, models, run_name=f"overhead-{arch}-{workers}")
    return [h["train_seconds"] for h in card["history"]]


def summary(times: list[float]) -> dict:
    later = times[1:]
    return {"mean_s": round(float(np.mean(later)), 1), "steady": round(max(later) / min(later), 2), "all_s": [round(t, 1) for t in times]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/isic-9class/Train"))
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--recipes", default="default,residual-sep-v2", help="architectures, comma-separated")
    parser.add_argument("--workers", default="1,2", help="Ray Train worker counts, comma-separated")
    parser.add_argument("--plain", nargs=3, metavar=("WORK", "ARCH", "EPOCHS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = os.cpu_count() or 1
    if args.plain:  # the child process of one plain fit: TensorFlow's threads are fixed when it starts
        print(json.dumps(plain_fit(args.plain[0], args.plain[1], int(args.plain[2]), cores)))
        return

    import ray

    from melanoma import dataset, train

    figures: dict = {"cores": cores, "epochs": args.epochs, "load_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        work = str(tmp / "work")
        dataset.make_split(str(subset(Path(args.data), args.per_class, tmp / "data")), work, 0.2, 42)
        n_train = len(train.training_tables(work)[0])
        figures["train_images"] = n_train
        ray.init(num_cpus=cores + 2, include_dashboard=False, log_to_driver=False)
        for arch in args.recipes.split(","):
            out = subprocess.run([sys.executable, __file__, "--plain", work, arch, str(args.epochs)], check=True,
                                 capture_output=True, text=True)  # fmt: skip
            plain = summary(json.loads(out.stdout.strip().splitlines()[-1]))
            figures[f"{arch}_plain"] = plain
            for workers in (int(w) for w in args.workers.split(",")):
                ray_times = summary(ray_fit(work, str(tmp / "models"), arch, args.epochs, workers, n_train))
                figures[f"{arch}_ray_{workers}w"] = ray_times
                figures[f"{arch}_ratio_ray_{workers}w_vs_plain"] = round(ray_times["mean_s"] / plain["mean_s"], 2)
                print(f"{arch}: ray {workers} worker(s) {ray_times['mean_s']:.1f} s/epoch (all {ray_times['all_s']}), "
                      f"plain {plain['mean_s']:.1f} s/epoch (all {plain['all_s']}): ratio "
                      f"{ray_times['mean_s'] / plain['mean_s']:.2f}, steady {ray_times['steady']:.2f}", flush=True)  # fmt: skip
        ray.shutdown()
    figures["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
