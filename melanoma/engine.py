"""Inference engines: the published Keras model, or its TF-Lite export run by LiteRT's XNNPACK delegate.

On CPU the TF-Lite float32 export computes the same probabilities (within 1e-5) 1.5x (one thread) to 1.7x (two)
as fast as Keras `predict_on_batch`, close to the arithmetic limit, and LiteRT's interpreter loads without importing
TensorFlow, which takes seconds per process (docs/speed.md has the measurements, benchmarks/score_throughput.py
makes them). The export is produced at
publish time, for the input size on the card, and stored in the registry beside the model with its checksum on
the card; loading verifies it. GPU actors keep TensorFlow.
"""

from __future__ import annotations

import logging
import os
import tempfile

import numpy as np

from melanoma import registry, storage
from melanoma.config import ENGINES

log = logging.getLogger(__name__)

TFLITE_FILE = "model.tflite"


def export_tflite(model, image_size: int, calibration: np.ndarray | None = None) -> bytes:
    """The Keras model as a TF-Lite flatbuffer taking 0-255 float images of image_size x image_size (the
    augmentation layers are identities at inference and vanish from the graph). With calibration images, weights
    and activations are quantised to int8 (float input and output), their ranges set on those images."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="image")
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], model)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None].astype(np.float32)] for image in calibration)
    with tempfile.TemporaryDirectory() as tmp, _quiet_converter(tmp):
        return converter.convert()


class _quiet_converter:
    """The converter prints MLIR diagnostics to stderr from C++; they belong in the log file, not the console."""

    def __init__(self, tmp: str):
        self.path = os.path.join(tmp, "converter.log")

    def __enter__(self):
        self.saved = os.dup(2)
        self.file = open(self.path, "w")
        os.dup2(self.file.fileno(), 2)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.close()
        with open(self.path) as f:
            text = f.read().strip()
        if text:
            log.debug("TF-Lite converter: %s", text)


class KerasEngine:
    name = "keras"

    def __init__(self, model):
        self.model = model

    @classmethod
    def load(cls, version_dir: str, threads: int) -> "KerasEngine":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:  # TensorFlow already ran in this process: its thread pools are fixed
            log.debug("TensorFlow already initialised; keeping its thread pools")
        return cls(registry.load(version_dir).model)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_on_batch(images.astype(np.float32)), dtype=np.float64)


class TFLiteEngine:
    """One interpreter, resized to each batch's length (resizing reallocates only when the length changes)."""

    name = "tflite"

    def __init__(self, flatbuffer: bytes, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_content=flatbuffer, num_threads=max(threads, 1))
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = 0

    def predict(self, images: np.ndarray) -> np.ndarray:
        if len(images) != self._batch:
            self._interpreter.resize_tensor_input(self._input, [len(images), *images.shape[1:]])
            self._interpreter.allocate_tensors()
            self._batch = len(images)
        self._interpreter.set_tensor(self._input, images.astype(np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).astype(np.float64)


def _chosen(engine: str, card: dict, gpu: bool) -> str:
    if engine not in ENGINES:
        raise registry.ModelError(f"engine '{engine}' is not one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "tflite" if not gpu and TFLITE_FILE in card.get("files", {}) else "keras"
    return engine


def _flatbuffer(version_dir: str, card: dict) -> bytes:
    flatbuffer = registry.read_extra(version_dir, card, TFLITE_FILE)
    if flatbuffer is None:
        raise registry.ModelError(f"{version_dir}: published without a TF-Lite export ({TFLITE_FILE}); use --engine keras")
    return flatbuffer


def check(model_uri: str, engine: str, gpu: bool = False) -> tuple[str, dict, str]:
    """(version dir, card, engine chosen) once the files that engine will load are verified; for TF-Lite without
    importing TensorFlow, so the driver of a scoring run starts quickly."""
    version_dir = registry.resolve(model_uri)
    card = registry.read_card(version_dir)
    chosen = _chosen(engine, card, gpu)
    if chosen == "tflite":
        _flatbuffer(version_dir, card)
        return version_dir, card, chosen
    return version_dir, registry.load(version_dir).card, chosen


def load(model_uri: str, engine: str, threads: int, gpu: bool = False):
    """(engine, card, version dir). `auto` runs the TF-Lite export on CPU when the version has one, else Keras.
    Asking for `tflite` of a version published without an export is an error."""
    version_dir = registry.resolve(model_uri)
    card = registry.read_card(version_dir)
    if _chosen(engine, card, gpu) == "tflite":
        flatbuffer = _flatbuffer(version_dir, card)
        try:
            return TFLiteEngine(flatbuffer, threads), card, version_dir
        except (ValueError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise registry.ModelError(f"{storage.join(version_dir, TFLITE_FILE)}: cannot be loaded: {reason}") from None
    return KerasEngine.load(version_dir, threads), card, version_dir
