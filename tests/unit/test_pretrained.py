"""The ImageNet EfficientNet-Lite0 read from the packaged torch pickle, proved on photographs of known classes."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from melanoma import model, pretrained

# ImageNet class indices: 281-285 are cats (285 Egyptian cat); 967 espresso, 968 cup.
CATS = {281, 282, 283, 284, 285}
COFFEE = {967, 968}


@pytest.fixture(scope="module")
def classifier():
    return model.imagenet_classifier(224)


def top5(classifier, image: np.ndarray) -> list[int]:
    probs = classifier.predict_on_batch(image[None].astype(np.float32))[0]
    return list(np.argsort(probs)[::-1][:5])


def test_cat_photo_is_a_cat(classifier):
    top = top5(classifier, data.chelsea())
    assert top[0] in CATS, top
    assert 285 in top, top


def test_coffee_photo_is_coffee(classifier):
    top = top5(classifier, data.coffee())
    assert top[0] in COFFEE, top
    assert 967 in top, top


def test_every_tensor_is_used_with_its_strides():
    state = pretrained.read_state_dict(pretrained.weights_file())
    weights = pretrained.keras_weights()
    used = sum(len(w) for w in weights.values())
    assert used == len([k for k in state if not k.endswith("num_batches_tracked")])
    # conv weights are stored permuted: a plain reshape would not give the strided view's values
    stem = state["_conv_stem.weight"]
    assert stem.shape == (32, 3, 3, 3)
    assert weights["stem_conv"][0].shape == (3, 3, 3, 32)
    np.testing.assert_array_equal(weights["stem_conv"][0][:, :, 1, 7], stem[7, 1])


def test_the_default_model_starts_from_imagenet_weights():
    built = model.build("efficientnet-lite0", 9, 128)
    np.testing.assert_array_equal(built.get_layer("head_conv").get_weights()[0], pretrained.keras_weights()["head_conv"][0])
    assert built.output_shape == (None, 9)


def test_freezing_keeps_the_stem_and_leading_blocks_fixed():
    built = model.build("efficientnet-lite0", 9, 128)
    model.freeze_backbone(built, 3)
    assert not built.get_layer("stem_conv").trainable and not built.get_layer("block2_dwconv").trainable
    assert built.get_layer("block3_dwconv").trainable and built.get_layer("probabilities").trainable


def test_a_file_that_is_not_the_weights_is_one_line(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(pretrained.WeightsError, match="weights.pth: cannot read the weights"):
        pretrained.read_state_dict(bad)
