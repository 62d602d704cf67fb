"""Training on Ray Train: a Keras 3 custom loop under MultiWorkerMirroredStrategy, fed from Ray Data
shards, with checkpoints in a storage path (local or s3://), resume, early stopping on validation loss,
then evaluation and calibration on the never-augmented validation split, and publication to the registry.

Why a custom loop: Keras 3 `model.fit` fails under MultiWorkerMirroredStrategy with two or more workers
(tensorflow/tensorflow#72388). A loop of strategy.run + GradientTape uses public APIs only, keeps
Keras 3 (no tf-keras, which pulls the full tensorflow package), and its .keras file loads anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from importlib.metadata import version as package_version

import numpy as np
import pandas as pd
import ray
import ray.train
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.tensorflow import TensorflowTrainer

from melanoma import augment, dataset, drift, engine, images, metrics, registry, runtime, sources, storage
from melanoma.config import CLASS_NAMES, MELANOMA, Settings

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LAST_MODEL = "last.keras"
BEST_MODEL = "best.keras"


def load_images(batch: pd.DataFrame, image_size: int, max_pixels: int, max_side: int) -> dict:
    """Ray Data map step: uri -> image (image_size x image_size x 3 uint8), label, and the width and height it was
    decoded at (for the drift reference)."""
    decoded = [images.decode(storage.read_bytes(uri), max_pixels, max_side) for uri in batch["uri"]]
    return {
        "image": np.stack([images.resize(d, image_size) for d in decoded]),
        "label": batch["label_index"].to_numpy(np.int64),
        "width": np.array([d.shape[1] for d in decoded], dtype=np.int32),
        "height": np.array([d.shape[0] for d in decoded], dtype=np.int32),
    }


def training_tables(data_uri: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows = train split + its augmented samples, val rows = val split), with label_index
    (-1 for an image known only as not a melanoma). Test rows are never read here."""
    manifest = sources.with_source_columns(dataset.read_manifest(data_uri))
    augmented = augment.read_augmented(data_uri)
    train = manifest[manifest["split"] == "train"]
    if augmented is not None:
        train = pd.concat([train, augmented.assign(melanoma=(augmented["label"] == MELANOMA).astype(int))], ignore_index=True)
    val = manifest[manifest["split"] == "val"]
    return with_label_index(train), with_label_index(val)


def with_label_index(rows: pd.DataFrame) -> pd.DataFrame:
    out = rows.reset_index(drop=True).copy()
    out["label_index"] = [CLASS_NAMES.index(label) if isinstance(label, str) else -1 for label in out["label"]]
    return out


def _threads(s: Settings) -> int:
    return s.threads_per_worker if s.threads_per_worker > 0 else max(1, (os.cpu_count() or 1) // max(s.workers, 1))


def _learning_rate(config: dict):
    """A float, or a cosine schedule over the whole run with one epoch of linear warm-up from 10%."""
    import keras

    lr = config["learning_rate"]
    if config.get("lr_schedule", "constant") == "constant":
        return lr
    if config["lr_schedule"] != "cosine":
        raise ValueError(f"unknown lr_schedule '{config['lr_schedule']}' (expected constant or cosine)")
    steps = max(int(config["steps_per_epoch"]), 1)
    warmup = steps if config["epochs"] > 1 else 0
    return keras.optimizers.schedules.CosineDecay(
        lr * 0.1 if warmup else lr, max(steps * config["epochs"] - warmup, 1), alpha=0.01,
        warmup_target=lr if warmup else None, warmup_steps=warmup,
    )


def _image_dataset(rows: pd.DataFrame, s: Settings) -> ray.data.Dataset:
    return (
        ray.data.from_pandas(rows[["uri", "label_index"]])
        .map_batches(
            load_images,
            batch_format="pandas",
            batch_size=s.decode_batch_size,
            fn_kwargs={"image_size": s.image_size, "max_pixels": s.max_image_pixels, "max_side": s.max_decoded_side},
        )
        .materialize()
    )


def _read_shard(name: str) -> tuple[np.ndarray, np.ndarray]:
    """This worker's share of a dataset, read once into memory: every epoch is then drawn from it locally, so
    no epoch waits on Ray Data's split coordinator."""
    images_, labels = [], []
    for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=1024, batch_format="numpy"):
        images_.append(batch["image"])
        labels.append(batch["label"])
    return np.concatenate(images_), np.concatenate(labels)


def epoch_draw(labels: np.ndarray, n: int, power: float, seed: int) -> np.ndarray:
    """n row indices, each row drawn with probability proportional to n_class ** -power (images without a
    class, label -1, form a class of their own); power 0 and n = len(labels) is a plain shuffle."""
    rng = np.random.default_rng(seed)
    if power == 0 and n == len(labels):
        return rng.permutation(n)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    weights = counts[inverse].astype(float) ** -power
    return rng.choice(len(labels), size=n, replace=True, p=weights / weights.sum())


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. Rank 0 reports the checkpoint; every rank saves its own copy."""
    import keras
    import tensorflow as tf

    from melanoma import model as architectures

    threads = int(config["threads_per_worker"])
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    keras.utils.set_random_seed(config["seed"])

    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    global_batch = config["batch_size"]
    per_worker = max(global_batch // world, 1)
    train_x, train_y = _read_shard("train")
    val_x, val_y = _read_shard("val")
    # The shards are equal, so every worker runs the same number of steps (each step's all-reduce waits for all).
    train_steps = max(int(config["epoch_images"]) // world // per_worker, 1)
    size, lowres_share, min_side = int(config["image_size"]), float(config["lowres_share"]), int(config["lowres_min_side"])

    state = {"epoch": 0, "best_val_loss": None, "bad_epochs": 0, "history": []}
    best_model = os.path.join(tempfile.mkdtemp(), BEST_MODEL)
    checkpoint = ray.train.get_checkpoint()
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as d:
                with open(os.path.join(d, STATE_FILE)) as f:
                    state = json.load(f)
                shutil.copy(os.path.join(d, BEST_MODEL), best_model)
                model = keras.models.load_model(os.path.join(d, LAST_MODEL))
        else:
            model = architectures.build(config["arch"], len(CLASS_NAMES), size)
            architectures.freeze_backbone(model, int(config["freeze_blocks"]))
            model.compile(optimizer=keras.optimizers.Adam(_learning_rate(config)))
    optimizer = model.optimizer
    melanoma_index = CLASS_NAMES.index(MELANOMA)

    def per_example_loss(y, probs):
        """Cross-entropy of the class; for an image known only as not a melanoma (y = -1), -log(1 - p_melanoma)."""
        p_class = tf.gather(probs, tf.maximum(y, 0), batch_dims=1)
        p = tf.where(y >= 0, p_class, 1.0 - probs[:, melanoma_index])
        return -tf.math.log(tf.clip_by_value(p, 1e-7, 1.0))

    def lowres(x):
        """A share of a batch's images shrunk to a random side (one per batch) and enlarged back: blur is seen in
        every class and source."""
        side = tf.random.uniform([], min_side, size + 1, dtype=tf.int32)
        blurred = tf.image.resize(tf.image.resize(x, [side, side], antialias=True), [size, size])
        return tf.where(tf.random.uniform([tf.shape(x)[0], 1, 1, 1]) < lowres_share, blurred, x)

    @tf.function
    def train_step(x, y):
        def step(x, y):
            x = tf.cast(x, tf.float32)
            if lowres_share > 0:
                x = lowres(x)
            with tf.GradientTape() as tape:
                probs = model(x, training=True)
                loss = tf.nn.compute_average_loss(per_example_loss(y, probs), global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=(x, y)), axis=None)

    @tf.function
    def val_step(x, y):
        def step(x, y):
            probs = model(tf.cast(x, tf.float32), training=False)
            labelled = tf.cast(y >= 0, tf.float32)
            correct = tf.reduce_sum(labelled * tf.cast(tf.equal(tf.argmax(probs, axis=1), y), tf.float32))
            total = tf.cast(tf.shape(y)[0], tf.float32)
            return tf.stack([tf.reduce_sum(per_example_loss(y, probs)), correct, tf.reduce_sum(labelled), total])

        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=(x, y)), axis=None)

    def batches(x, y, order):
        """This worker's batches of per_worker images, gathered from its in-memory shard. Each worker feeds its own
        replica directly: a distributed tf.data dataset would split every batch again across the workers and end
        each epoch with a cross-worker end-of-data check that cost seconds (docs/speed.md)."""
        for i in range(0, len(order) - per_worker + 1, per_worker):
            rows = order[i : i + per_worker]
            yield tf.constant(x[rows]), tf.constant(y[rows])

    for epoch in range(state["epoch"], config["epochs"]):
        started = time.time()
        draw_seed = config["seed"] * 1000 + epoch * 10 + rank
        order = epoch_draw(train_y, train_steps * per_worker, float(config["balance_power"]), draw_seed)
        losses = [float(train_step(x, y)) for x, y in batches(train_x, train_y, order)]
        train_seconds = time.time() - started
        val_batches = batches(val_x, val_y, np.arange(len(val_y)))
        totals = np.sum([val_step(x, y).numpy() for x, y in val_batches], axis=0)
        val_loss, val_accuracy = float(totals[0] / totals[3]), float(totals[1] / max(totals[2], 1))
        improved = state["best_val_loss"] is None or val_loss < state["best_val_loss"]
        state["epoch"] = epoch + 1
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["best_val_loss"] = val_loss if improved else state["best_val_loss"]
        epoch_metrics = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "train_seconds": train_seconds,
            "epoch_seconds": time.time() - started,
        }
        state["history"].append(epoch_metrics)
        stop = state["bad_epochs"] >= config["patience"] or state["epoch"] >= config["epochs"]
        state["finished"] = stop
        if improved:
            model.save(best_model)
        with tempfile.TemporaryDirectory() as d:
            model.save(os.path.join(d, LAST_MODEL))
            shutil.copy(best_model, os.path.join(d, BEST_MODEL))
            with open(os.path.join(d, STATE_FILE), "w") as f:
                json.dump(state, f)
            reported = ray.train.Checkpoint.from_directory(d) if rank == 0 else None
            ray.train.report(epoch_metrics, checkpoint=reported)
        if rank == 0:  # Ray Train has no driver-side callback for reports: the driver's bar reads this
            config["progress"].reach(state["epoch"], f"epoch {state['epoch']}/{config['epochs']}: train loss "
                                     f"{epoch_metrics['train_loss']:.3f}, val loss {val_loss:.3f}, val accuracy "
                                     f"{val_accuracy:.3f} ({epoch_metrics['epoch_seconds']:.0f} s)")  # fmt: skip
        if stop:
            break


def _predict(model, rows: pd.DataFrame, s: Settings) -> np.ndarray:
    return _predict_measured(model, rows, s)[0]


def _predict_measured(model, rows: pd.DataFrame, s: Settings) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Class probabilities of the rows, and the drift statistics of the same decoded images."""
    probs, stats = [], []
    for start in range(0, len(rows), s.decode_batch_size):
        chunk = rows.iloc[start : start + s.decode_batch_size]
        batch = load_images(chunk, s.image_size, s.max_image_pixels, s.max_decoded_side)
        probs.append(model.predict_on_batch(batch["image"].astype(np.float32)))
        stats.append(drift.image_stats(batch["image"], batch["width"], batch["height"]))
    return np.concatenate(probs), {k: np.concatenate([b[k] for b in stats]) for k in drift.STAT_COLUMNS}


def evaluate(model, val: pd.DataFrame, s: Settings) -> tuple[dict, dict]:
    """Metrics before and after calibration on the validation split, with the alert threshold; and the drift
    reference of the same images and calibrated probabilities (melanoma/drift.py)."""
    probs, stats = _predict_measured(model, val, s)
    labels = val["label_index"].to_numpy()
    mel = CLASS_NAMES.index(MELANOMA)
    calibration = metrics.calibrate(probs, labels, mel, s.target_sensitivity, s.seed)
    calibrated = metrics.temperature_scale(probs, calibration["temperature"])
    report = metrics.classification_report(calibrated, labels, list(CLASS_NAMES), MELANOMA)
    fpr, tpr = metrics.roc_curve(calibrated[:, mel], labels == mel)
    reference = drift.reference(stats, calibrated, calibration["alert_threshold"], list(CLASS_NAMES), MELANOMA)
    return report | {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}, "calibration": calibration}, reference


def _file_sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


RECIPE_FIELDS = (
    "arch", "image_size", "epochs", "batch_size", "learning_rate", "lr_schedule", "patience", "freeze_blocks",
    "epoch_images", "balance_power", "lowres_share", "lowres_min_side",
)


def recipe(s: Settings) -> dict:
    """The settings that make a training what it is (in the card, and in the run name)."""
    return {name: getattr(s, name) for name in RECIPE_FIELDS}


def run_name_for(s: Settings, data_uri: str) -> str:
    """Same command, same run: rerunning resumes from the last checkpoint."""
    key = json.dumps([data_uri, recipe(s), s.seed, s.workers], sort_keys=True)
    return f"{s.arch}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def train(s: Settings, data_uri: str, model_dir: str, storage_uri: str | None = None, run_name: str | None = None) -> dict:
    """Train, evaluate, calibrate, publish. Returns the model card."""
    storage.check_writable(model_dir)
    train_rows, val_rows = training_tables(data_uri)
    if len(val_rows) < s.batch_size or len(train_rows) < s.batch_size:
        raise dataset.DatasetError(
            f"{data_uri}: {len(train_rows)} train and {len(val_rows)} val images; each split needs at least one batch ({s.batch_size})"
        )
    epoch_images = min(s.epoch_images, len(train_rows)) if s.epoch_images > 0 else len(train_rows)
    storage_uri = storage_uri or storage.join(model_dir, "_runs")
    run_name = run_name or run_name_for(s, data_uri)
    fs, path = storage.pyarrow_fs(storage_uri)
    log.info("training %s on %d images (%d val) with %d workers, run %s", s.arch, len(train_rows), len(val_rows), s.workers, run_name)
    datasets = {"train": _image_dataset(train_rows, s), "val": _image_dataset(val_rows, s)}
    started = time.time()
    with runtime.remote_progress(s.epochs, "train", "epoch") as progress:
        trainer = TensorflowTrainer(
            train_loop,
            train_loop_config=recipe(s) | {
                "seed": s.seed,
                "threads_per_worker": _threads(s),
                "epoch_images": epoch_images,
                "steps_per_epoch": -(-epoch_images // s.batch_size),
                "progress": progress,
            },
            scaling_config=ScalingConfig(
                num_workers=s.workers,
                use_gpu=s.gpus_per_worker > 0,
                resources_per_worker={"CPU": 1, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker > 0 else {})},
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=path,
                storage_filesystem=fs,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
            datasets=datasets,
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} produced no checkpoint: {result.error}")
    import keras

    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            state = json.load(f)
        model = keras.models.load_model(os.path.join(d, BEST_MODEL), compile=False)
    facts = {
        "arch": s.arch,
        "train_images": len(train_rows),
        "epochs_run": state["epoch"],
        "history": state["history"],
        "workers": s.workers,
        "recipe": recipe(s),
        "run_name": run_name,
        "training_seconds": round(time.time() - started, 1),
    }
    return publish_evaluated(model, s, data_uri, val_rows, model_dir, facts)


def publish_evaluated(model, s: Settings, data_uri: str, val_rows: pd.DataFrame, model_dir: str, facts: dict) -> dict:
    """Evaluate and calibrate `model` on the validation rows of `data_uri`, then publish it with a card of the
    common fields plus `facts` (which must name the "arch"). Returns the card."""
    with tempfile.TemporaryDirectory() as tmp:
        model_file = os.path.join(tmp, registry.MODEL_FILE)
        model.save(model_file)
        evaluation, reference = evaluate(model, val_rows, s)
        card = {
            "version": registry.new_version(facts["arch"]),
            "class_names": list(CLASS_NAMES),
            "positive_class": MELANOMA,
            "input_size": [s.image_size, s.image_size, 3],
            "training_manifest_sha256": _file_sha256(storage.join(data_uri, dataset.MANIFEST)),
            "data_uri": data_uri,
            "split_seed": _split_seed(data_uri),
            "seed": s.seed,
            "val_images": len(val_rows),
            **facts,
            "metrics": {k: v for k, v in evaluation.items() if k != "calibration"},
            "calibration": evaluation["calibration"],
            "temperature": evaluation["calibration"]["temperature"],
            "alert_threshold": evaluation["calibration"]["alert_threshold"],
            "libraries": _library_versions(),
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        extras = {
            engine.TFLITE_FILE: engine.export_tflite(model, s.image_size),
            drift.REFERENCE_FILE: json.dumps(reference).encode(),
        }
        target = registry.publish(model_dir, model_file, card, extras)
    log.info("published %s", target)
    return card


def _split_seed(data_uri: str) -> int | None:
    uri = storage.join(data_uri, "audit.json")
    return json.loads(storage.read_bytes(uri)).get("split_seed") if storage.exists(uri) else None


def _library_versions() -> dict:
    import tensorflow as tf

    return {"tensorflow": tf.__version__} | {p: package_version(p) for p in ("keras", "ray", "numpy", "pillow", "Augmentor")}
