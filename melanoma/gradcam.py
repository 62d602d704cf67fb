"""Grad-CAM (Selvaraju et al. 2017): where in a picture a loaded model found its melanoma risk.

The map is taken on the convolutional feature map that the model pools into its classifier: the input of its
first layer that turns a 4-D tensor (batch, height, width, channels) into a 2-D one (global pooling, Flatten).
That holds for every architecture in melanoma/model.py, whatever layers follow the features. An ensemble (its
members are nested models, each ending in class probabilities) gets the mean of its members' maps, as its
probability is the mean of theirs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from melanoma import images, registry
from melanoma.config import MELANOMA, settings


def grad_cam(loaded: registry.LoadedModel) -> Callable[[np.ndarray], np.ndarray]:
    """picture (HxWx3 uint8) -> heat map of the melanoma probability, size x size in [0, 1] over the model input."""
    import keras
    import tensorflow as tf

    size = loaded.card.get("input_size", [settings().image_size])[0]
    positive = loaded.class_names.index(loaded.card.get("positive_class", MELANOMA))
    cam_models = [keras.Model(m.inputs, [feature_map(m), m.output]) for m in members(loaded.model)]

    def heat_of(picture: np.ndarray) -> np.ndarray:
        x = tf.convert_to_tensor(images.resize(picture, size)[None].astype(np.float32))
        cams = []
        for cam_model in cam_models:
            with tf.GradientTape() as tape:
                features, probs = cam_model(x, training=False)
                target = probs[:, positive]
            weights = tf.reduce_mean(tape.gradient(target, features), axis=(1, 2))
            cam = tf.nn.relu(tf.reduce_sum(features * weights[:, None, None, :], axis=-1))
            cams.append(tf.image.resize(cam[..., None], (size, size))[0, ..., 0].numpy())
        cam = np.mean(cams, axis=0)
        return cam / cam.max() if cam.max() > 0 else cam

    return heat_of


def members(model) -> list:
    """The models whose maps are averaged: an ensemble's members (nested models with the model's own output shape:
    class probabilities), else the model itself. A nested backbone is part of its model, not a member."""
    import keras

    classes = tuple(model.output_shape[1:])
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model) and tuple(layer.output.shape[1:]) == classes]
    return nested or [model]


def feature_map(model):
    """The 4-D tensor that the model's first 4-D -> 2-D layer (global pooling, Flatten) takes."""
    for layer in model.layers:
        features = layer.input
        if _rank(features) == 4 and _rank(layer.output) == 2:
            if any(features is given for given in model.inputs):
                break  # pooling the raw image: no feature map to explain
            return features
    raise registry.ModelError(f"model {model.name} has no convolutional feature map before its classifier for Grad-CAM")


def _rank(tensor) -> int | None:
    """The rank of a symbolic tensor; None for a list of them (a layer with several inputs, e.g. Concatenate)."""
    return len(tensor.shape) if hasattr(tensor, "shape") else None
