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

from melanoma import augment, dataset, images, metrics, registry, storage
from melanoma.config import CLASS_NAMES, MELANOMA, Settings

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LAST_MODEL = "last.keras"
BEST_MODEL = "best.keras"


def load_images(batch: pd.DataFrame, image_size: int, max_pixels: int, max_side: int) -> dict:
    """Ray Data map step: uri -> image (image_size x image_size x 3 uint8)."""
    pixels = [
        images.resize(images.decode(storage.read_bytes(uri), max_pixels, max_side), image_size) for uri in batch["uri"]
    ]
    return {"image": np.stack(pixels), "label": batch["label_index"].to_numpy(np.int64)}


def training_tables(data_uri: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows = train split + its augmented samples, val rows = val split), with label_index."""
    manifest = dataset.read_manifest(data_uri)
    augmented = augment.read_augmented(data_uri)
    train = manifest[manifest["split"] == "train"]
    if augmented is not None:
        train = pd.concat([train, augmented], ignore_index=True)
    val = manifest[manifest["split"] == "val"]
    for frame in (train, val):
        frame["label_index"] = frame["label"].map(CLASS_NAMES.index)
    return train.reset_index(drop=True), val.reset_index(drop=True)


def class_weights(labels: pd.Series, cap: float = 0.0) -> list[float]:
    """Balanced weights n / (k * n_c), at most `cap` when cap > 0; classes absent from training get weight 0."""
    counts = labels.value_counts()
    present = len(counts)
    weights = [float(len(labels) / (present * counts[i])) if i in counts else 0.0 for i in range(len(CLASS_NAMES))]
    return [min(w, cap) for w in weights] if cap > 0 else weights


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
    world = ctx.get_world_size()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    global_batch = config["batch_size"]
    per_worker = max(global_batch // world, 1)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF

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
            model = architectures.build(config["arch"], len(CLASS_NAMES), config["image_size"])
            model.compile(optimizer=keras.optimizers.Adam(_learning_rate(config)))
        weights = tf.constant(config["class_weights"], dtype=tf.float32)
    optimizer = model.optimizer
    smoothing = float(config.get("label_smoothing", 0.0))

    @tf.function
    def train_step(x, y):
        def step(x, y):
            with tf.GradientTape() as tape:
                probs = model(tf.cast(x, tf.float32), training=True)
                if smoothing > 0:
                    targets = tf.one_hot(y, len(CLASS_NAMES))
                    per_example = keras.losses.categorical_crossentropy(targets, probs, label_smoothing=smoothing)
                else:
                    per_example = keras.losses.sparse_categorical_crossentropy(y, probs)
                per_example = per_example * tf.gather(weights, y)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=(x, y)), axis=None)

    @tf.function
    def val_step(x, y):
        def step(x, y):
            probs = model(tf.cast(x, tf.float32), training=False)
            loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, probs))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, axis=1), y), tf.float32))
            return tf.stack([loss, correct, tf.cast(tf.shape(y)[0], tf.float32)])

        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=(x, y)), axis=None)

    def batches(name: str, epoch: int, shuffle: bool):
        # drop_last: the shards are equal-sized, so every worker runs the same steps, and no step sees a
        # one-image batch (a 3,330-row epoch over 2 workers x 16 left one, and the train step failed on it).
        shard = ray.train.get_dataset_shard(name)
        ds = shard.to_tf(
            "image",
            "label",
            batch_size=per_worker,
            drop_last=True,
            local_shuffle_buffer_size=config["shuffle_buffer_size"] if shuffle else None,
            local_shuffle_seed=config["seed"] + epoch if shuffle else None,
        )
        return strategy.experimental_distribute_dataset(ds.with_options(options))

    for epoch in range(state["epoch"], config["epochs"]):
        started = time.time()
        losses = [float(train_step(x, y)) for x, y in batches("train", epoch, shuffle=True)]
        train_seconds = time.time() - started
        totals = np.sum([val_step(x, y).numpy() for x, y in batches("val", epoch, shuffle=False)], axis=0)
        val_loss, val_accuracy = float(totals[0] / totals[2]), float(totals[1] / totals[2])
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
            reported = ray.train.Checkpoint.from_directory(d) if ctx.get_world_rank() == 0 else None
            ray.train.report(epoch_metrics, checkpoint=reported)
        if stop:
            break


def _predict(model, rows: pd.DataFrame, s: Settings) -> np.ndarray:
    probs = []
    for start in range(0, len(rows), s.decode_batch_size):
        chunk = rows.iloc[start : start + s.decode_batch_size]
        batch = load_images(chunk, s.image_size, s.max_image_pixels, s.max_decoded_side)["image"]
        probs.append(model.predict_on_batch(batch.astype(np.float32)))
    return np.concatenate(probs)


def evaluate(model, val: pd.DataFrame, s: Settings) -> dict:
    """Metrics before and after calibration on the validation split, with the alert threshold."""
    probs = _predict(model, val, s)
    labels = val["label_index"].to_numpy()
    mel = CLASS_NAMES.index(MELANOMA)
    calibration = metrics.calibrate(probs, labels, mel, s.target_sensitivity, s.seed)
    calibrated = metrics.temperature_scale(probs, calibration["temperature"])
    report = metrics.classification_report(calibrated, labels, list(CLASS_NAMES), MELANOMA)
    fpr, tpr = metrics.roc_curve(calibrated[:, mel], labels == mel)
    return report | {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}, "calibration": calibration}


def _file_sha256(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def run_name_for(s: Settings, data_uri: str) -> str:
    """Same command, same run: rerunning resumes from the last checkpoint."""
    key = f"{data_uri}|{s.arch}|{s.epochs}|{s.batch_size}|{s.learning_rate}|{s.seed}|{s.workers}"
    return f"{s.arch}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def train(s: Settings, data_uri: str, model_dir: str, storage_uri: str | None = None, run_name: str | None = None) -> dict:
    """Train, evaluate, calibrate, publish. Returns the model card."""
    storage.check_writable(model_dir)
    train_rows, val_rows = training_tables(data_uri)
    if len(val_rows) < s.batch_size or len(train_rows) < s.batch_size:
        raise dataset.DatasetError(
            f"{data_uri}: {len(train_rows)} train and {len(val_rows)} val images; each split needs at least one batch ({s.batch_size})"
        )
    storage_uri = storage_uri or storage.join(model_dir, "_runs")
    run_name = run_name or run_name_for(s, data_uri)
    fs, path = storage.pyarrow_fs(storage_uri)
    log.info("training %s on %d images (%d val) with %d workers, run %s", s.arch, len(train_rows), len(val_rows), s.workers, run_name)
    trainer = TensorflowTrainer(
        train_loop,
        train_loop_config={
            "arch": s.arch,
            "image_size": s.image_size,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "learning_rate": s.learning_rate,
            "patience": s.patience,
            "seed": s.seed,
            "class_weights": class_weights(train_rows["label_index"], s.class_weight_cap),
            "threads_per_worker": _threads(s),
            "shuffle_buffer_size": s.shuffle_buffer_size,
            "lr_schedule": s.lr_schedule,
            "label_smoothing": s.label_smoothing,
            "steps_per_epoch": -(-len(train_rows) // s.batch_size),
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
        datasets={"train": _image_dataset(train_rows, s), "val": _image_dataset(val_rows, s)},
    )
    started = time.time()
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
        "recipe": {
            "image_size": s.image_size, "batch_size": s.batch_size, "learning_rate": s.learning_rate,
            "lr_schedule": s.lr_schedule, "label_smoothing": s.label_smoothing,
            "class_weight_cap": s.class_weight_cap, "epochs": s.epochs, "patience": s.patience,
        },
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
        evaluation = evaluate(model, val_rows, s)
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
        target = registry.publish(model_dir, model_file, card)
    log.info("published %s", target)
    return card


def _split_seed(data_uri: str) -> int | None:
    uri = storage.join(data_uri, "audit.json")
    return json.loads(storage.read_bytes(uri)).get("split_seed") if storage.exists(uri) else None


def _library_versions() -> dict:
    import tensorflow as tf

    return {"tensorflow": tf.__version__} | {p: package_version(p) for p in ("keras", "ray", "numpy", "pillow", "Augmentor")}
