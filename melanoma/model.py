"""Keras architectures. Every model takes RGB images of any size (0-255) and resizes and rescales them
itself, so scoring can never preprocess differently from training. Outputs are class probabilities.

Only built-in Keras layers are used, so every published model loads with `safe_mode=True`.

- "seed-cnn": the seed notebook's CNN (60.7M parameters at 180x180), kept as the baseline.
- "residual-sep": a small residual separable-conv net with flips, +-36 degree rotations and zooms as
  layers.
- "residual-sep-v2": a conv stem, four residual separable blocks, average+max pooling, and stronger
  augmentation layers (full rotations, random-resized crops between 0.75x and 1.25x scale,
  brightness/contrast jitter); the best model trained from scratch (docs/quality.md).
- "efficientnet-lite0": EfficientNet-Lite0 with ImageNet weights (melanoma/pretrained.py), the same
  augmentation layers, a new 9-class head; the default (docs/quality.md).
"""

from __future__ import annotations

import keras
from keras import layers

from melanoma import pretrained
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
    return keras.Model(inputs, outputs, name="residual_sep")


def residual_sep_v2(num_classes: int, image_size: int) -> keras.Model:
    """Dermoscopy has no up or down, so: any rotation, both flips, random-resized crops (zoom in or out
    by up to 25%, aspect jitter via independent height/width factors), mild brightness/contrast jitter
    for camera differences. A two-conv stem, residual separable blocks to 1/32 of the input, and
    average+max pooling (a small lesion feature should not be averaged away). Batch-norm momentum 0.9, not
    Keras's 0.99: with ~50 steps an epoch, 0.99 moving statistics lag the weights by epochs, and inference
    then collapses onto one class for the first epochs."""
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = _augmentation(_preprocess(inputs, image_size))
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


def _augmentation(x):
    """Dermoscopy has no up or down: any rotation, both flips, random-resized crops, mild brightness and
    contrast jitter for camera differences. On 0-1 pixels; inactive at inference."""
    x = layers.RandomFlip("horizontal_and_vertical")(x)
    x = layers.RandomRotation(0.5, fill_mode="reflect")(x)
    x = layers.RandomZoom((-0.25, 0.25), (-0.25, 0.25), fill_mode="reflect")(x)
    x = layers.RandomBrightness(0.1, value_range=(0.0, 1.0))(x)
    return layers.RandomContrast(0.15)(x)


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if activation else x


def _mbconv(x, i: int, kernel: int, stride: int, expand: int, filters: int):
    """EfficientNet-Lite's inverted residual block: no squeeze-excite, ReLU6."""
    inputs, channels = x, x.shape[-1]
    if expand != 1:
        x = _conv_bn(x, channels * expand, 1, 1, f"block{i}_expand")
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"block{i}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name=f"block{i}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"block{i}_dw_relu")(x)
    x = _conv_bn(x, filters, 1, 1, f"block{i}_project", activation=False)
    return layers.add([x, inputs], name=f"block{i}_add") if stride == 1 and channels == filters else x


def efficientnet_lite0_features(x):
    """The ImageNet-trained feature extractor on pixels already scaled by `imagenet_scaling`."""
    x = _conv_bn(x, pretrained.STEM_CHANNELS, 3, 2, "stem")
    for i, (kernel, stride, expand, filters) in enumerate(pretrained.BLOCKS):
        x = _mbconv(x, i, kernel, stride, expand, filters)
    return _conv_bn(x, pretrained.HEAD_CHANNELS, 1, 1, "head")


def imagenet_scaling(x):
    """0-1 pixels to the port's ImageNet input range, (x - 0.498) / 0.502."""
    return layers.Rescaling(1.0 / 0.502, offset=-0.498 / 0.502, name="imagenet_scale")(x)


def load_imagenet_weights(model: keras.Model) -> None:
    """Every backbone layer of `model` gets its ImageNet weights; layers the weights do not name are left as built."""
    for name, weights in pretrained.keras_weights().items():
        try:
            layer = model.get_layer(name)
        except ValueError:
            continue
        layer.set_weights(weights)


def imagenet_classifier(image_size: int = 224) -> keras.Model:
    """EfficientNet-Lite0 with its 1000-class ImageNet head: proves the weights are read right."""
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = imagenet_scaling(_preprocess(inputs, image_size))
    x = layers.GlobalAveragePooling2D(name="pool")(efficientnet_lite0_features(x))
    outputs = layers.Dense(1000, activation="softmax", name="imagenet_fc")(x)
    model = keras.Model(inputs, outputs, name="efficientnet_lite0_imagenet")
    load_imagenet_weights(model)
    return model


def efficientnet_lite0(num_classes: int, image_size: int) -> keras.Model:
    """ImageNet EfficientNet-Lite0 under a new head. Dropout 0.3 as in residual-sep-v2."""
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = imagenet_scaling(_augmentation(_preprocess(inputs, image_size)))
    x = layers.GlobalAveragePooling2D(name="pool")(efficientnet_lite0_features(x))
    x = layers.Dropout(0.3)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="efficientnet_lite0")
    load_imagenet_weights(model)
    return model


def freeze_backbone(model: keras.Model, blocks: int) -> None:
    """Freeze the stem and the first `blocks` MBConv blocks (their batch norm then runs in inference mode)."""
    frozen = ("stem_",) + tuple(f"block{i}_" for i in range(blocks))
    for layer in model.layers:
        if layer.name.startswith(frozen):
            layer.trainable = False


_BUILDERS = {
    "seed-cnn": seed_cnn,
    "residual-sep": residual_sep,
    "residual-sep-v2": residual_sep_v2,
    "efficientnet-lite0": efficientnet_lite0,
}


def build(arch: str, num_classes: int, image_size: int) -> keras.Model:
    name = DEFAULT_ARCH if arch == "default" else arch
    if name not in _BUILDERS:
        raise ValueError(f"unknown arch '{arch}' (expected one of {', '.join(ARCHS)})")
    return _BUILDERS[name](num_classes, image_size)
