"""Keras architectures. Every model takes RGB images of any size (0-255) and resizes and rescales them
itself, so scoring can never preprocess differently from training. Outputs are class probabilities."""

from __future__ import annotations

import keras
from keras import layers

ARCHS = ("default", "seed-cnn")


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


def _residual_block(x, filters: int):
    shortcut = layers.Conv2D(filters, 1, strides=2, padding="same", use_bias=False)(x)
    shortcut = layers.BatchNormalization()(shortcut)
    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    return layers.Activation("relu")(layers.add([x, shortcut]))


def default_cnn(num_classes: int, image_size: int) -> keras.Model:
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


def build(arch: str, num_classes: int, image_size: int) -> keras.Model:
    if arch == "seed-cnn":
        return seed_cnn(num_classes, image_size)
    if arch == "default":
        return default_cnn(num_classes, image_size)
    raise ValueError(f"unknown arch '{arch}' (expected one of {', '.join(ARCHS)})")
