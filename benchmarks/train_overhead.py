"""Epoch time of the 2-worker Ray Train run against a plain single-process Keras `fit` on the same data
and the same total CPUs. Prints both and the ratio (target <= 1.15).

    python benchmarks/train_overhead.py [--data ../shared/data/isic-9class/Train] [--per-class 60] [--epochs 3]

The first epoch of each (graph tracing, dataset materialisation) is left out of the mean.
"""

from __future__ import annotations

import argparse
import logging
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


def plain_fit(work: str, s, epochs: int) -> list[float]:
    import keras
    import tensorflow as tf

    from melanoma import model, train

    tf.config.threading.set_intra_op_parallelism_threads(s.workers)
    tf.config.threading.set_inter_op_parallelism_threads(s.workers)
    rows, _ = train.training_tables(work)
    batch = train.load_images(rows, s.image_size, s.max_image_pixels, s.max_decoded_side)
    net = model.build(s.arch, 9, s.image_size)
    net.compile(optimizer=keras.optimizers.Adam(s.learning_rate), loss="sparse_categorical_crossentropy", jit_compile=False)
    times = []
    for _ in range(epochs):
        started = time.time()
        net.fit(batch["image"].astype(np.float32), batch["label"], batch_size=s.batch_size, epochs=1, verbose=0)
        times.append(time.time() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/isic-9class/Train"))
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from melanoma import dataset, train
    from melanoma.config import settings

    s = settings(workers=2, epochs=args.epochs, batch_size=32, patience=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset.make_split(str(subset(Path(args.data), args.per_class, tmp / "data")), str(tmp / "work"), 0.2, s.seed)
        n_train = len(train.training_tables(str(tmp / "work"))[0])
        plain_epochs = plain_fit(str(tmp / "work"), s, args.epochs)  # first: TF threads are set before TF starts
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        card = train.train(s, str(tmp / "work"), str(tmp / "models"))
        ray.shutdown()
        ray_epochs = [h["train_seconds"] for h in card["history"]]
    ray_mean, plain_mean = np.mean(ray_epochs[1:]), np.mean(plain_epochs[1:])
    print(f"train images: {n_train}, arch {s.arch}, batch {s.batch_size}, epochs {args.epochs}")
    print(f"ray train, 2 workers x 1 CPU : {ray_mean:.1f} s/epoch  (all: {', '.join(f'{t:.1f}' for t in ray_epochs)})")
    print(f"plain fit, 1 process, 2 CPUs : {plain_mean:.1f} s/epoch  (all: {', '.join(f'{t:.1f}' for t in plain_epochs)})")
    print(f"ratio ray/plain: {ray_mean / plain_mean:.2f} (target <= 1.15)")


if __name__ == "__main__":
    main()
