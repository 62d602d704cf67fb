"""Keras architectures. Every model takes RGB images of any size (0-255) and resizes and rescales them
itself, so scoring can never preprocess differently from training. Outputs are class probabilities.

Only built-in Keras layers are used, so every published model loads with `safe_mode=True`.

- "seed-cnn": the seed notebook's CNN (60.7M parameters at 180x180), kept as the baseline.
- "residual-sep": the previous default, a small residual separable-conv net with flips, +-36 degree
  rotations and zooms as layers.
- "residual-sep-v2": the current default (see docs/quality.md): a conv stem, four residual separable
  blocks, average+max pooling, and stronger augmentation layers (full rotations, random-resized crops
  between 0.75x and 1.25x scale, brightness/contrast jitter).
"""

from __future__ import annotations

import keras
from keras import layers

from melanoma.config import ARCHS, DEFAULT_ARCH


def _preprocess(inputs, image_size: int):
    x = layers.Resizing(image_size, image_size, name="resize")(inputs)
    return layers.Rescaling(1.0 / 255, name="rescale")(x)


def seed_cnn(num_classes: int, image_size: int) -> keras.Model:
    """The seed notebook's final model, rebuilt from its reported shape: two valid conv blocks and a
    third same-padded one, Flatten of 43x43x64 = 118,336 into Dense 512 (60.7M parameters at 180x180)."""
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = _preprocess(inputs, image_size)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


def _residual_block(x, filters: int, bn_momentum: float = 0.99):
    shortcut = layers.Conv2D(filters, 1, strides=2, padding="same", use_bias=False)(x)
    shortcut = layers.BatchNormalization(momentum=bn_momentum)(shortcut)
    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=bn_momentum)(x)
    x = layers.Activation("relu")(x)
    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=bn_momentum)(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    return layers.Activation("relu")(layers.add([x, shortcut]))


def residual_sep(num_classes: int, image_size: int) -> keras.Model:
    """Residual separable-conv blocks with batch norm and global pooling; random flips, rotations and
    zooms are layers, so every epoch sees new views (they are inactive at inference)."""
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = _preprocess(inputs, image_size)
    x = layers.RandomFlip("horizontal_and_vertical")(x)
    x = layers.RandomRotation(0.1, fill_mode="reflect")(x)
    x = layers.RandomZoom(0.15, fill_mode="reflect")(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    for filters in (64, 128, 256):
        x = _residual_block(x, filters)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="default_cnn")


def residual_sep_v2(num_classes: int, image_size: int) -> keras.Model:
    """Dermoscopy has no up or down, so: any rotation, both flips, random-resized crops (zoom in or out
    by up to 25%, aspect jitter via independent height/width factors), mild brightness/contrast jitter
    for camera differences. A two-conv stem, residual separable blocks to 1/32 of the input, and
    average+max pooling (a small lesion feature should not be averaged away). Batch-norm momentum 0.9, not
    Keras's 0.99: with ~50 steps an epoch, 0.99 moving statistics lag the weights by epochs, and inference
    collapsed onto one class for the first epochs (seen here at epochs 1-3)."""
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = _preprocess(inputs, image_size)
    x = layers.RandomFlip("horizontal_and_vertical")(x)
    x = layers.RandomRotation(0.5, fill_mode="reflect")(x)
    x = layers.RandomZoom((-0.25, 0.25), (-0.25, 0.25), fill_mode="reflect")(x)
    x = layers.RandomBrightness(0.1, value_range=(0.0, 1.0))(x)
    x = layers.RandomContrast(0.15)(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.Activation("relu")(x)
    x = layers.Conv2D(32, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.Activation("relu")(x)
    for filters in (64, 128, 256, 384):
        x = _residual_block(x, filters, bn_momentum=0.9)
    x = layers.Concatenate()([layers.GlobalAveragePooling2D()(x), layers.GlobalMaxPooling2D()(x)])
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="residual_sep_v2")


_BUILDERS = {"seed-cnn": seed_cnn, "residual-sep": residual_sep, "residual-sep-v2": residual_sep_v2}


def build(arch: str, num_classes: int, image_size: int) -> keras.Model:
    name = DEFAULT_ARCH if arch == "default" else arch
    if name not in _BUILDERS:
        raise ValueError(f"unknown arch '{arch}' (expected one of {', '.join(ARCHS)})")
    return _BUILDERS[name](num_classes, image_size)
