"""melanoma.drift on generated arrays and on real HAM10000 and ISIC 2020 pixels: the statistics move the way a
darker, blurred or colour-cast image moves them, a sample of the validation distribution stays quiet, and a shift
is named in its reason."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from melanoma import drift, images
from melanoma.config import CLASS_NAMES, MELANOMA, settings

S = settings()
SIZE = 128


def _stats(pictures: list[np.ndarray]) -> dict[str, np.ndarray]:
    pixels = np.stack([images.resize(p, SIZE) for p in pictures])
    return drift.image_stats(pixels, [p.shape[1] for p in pictures], [p.shape[0] for p in pictures])


def _night_rows(stats: dict, probs: np.ndarray, threshold: float = 0.5) -> pd.DataFrame:
    risk = probs[:, CLASS_NAMES.index(MELANOMA)]
    rows = pd.DataFrame(stats)
    rows["melanoma_risk"], rows["flagged"] = risk, risk >= threshold
    rows["predicted_class"] = [CLASS_NAMES[k] for k in probs.argmax(axis=1)]
    return rows


def _probs(n: int, seed: int, melanoma_boost: float = 0.0) -> np.ndarray:
    probs = np.random.default_rng(seed).dirichlet(np.ones(len(CLASS_NAMES)), n)
    probs[:, CLASS_NAMES.index(MELANOMA)] += melanoma_boost
    return probs / probs.sum(axis=1, keepdims=True)


def _drift(rows: pd.DataFrame, reference: dict | None) -> dict:
    return drift.night_drift(rows, reference, "v1" if reference else None, S.drift_psi, S.drift_p_value)


def _reencoded(path, change=None) -> np.ndarray:
    """A real image, changed and saved again as JPEG (what a darker or blurrier camera would have written)."""
    image = Image.open(path).convert("RGB")
    if change is not None:
        image = change(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return images.decode(buffer.getvalue(), S.max_image_pixels, S.max_decoded_side)


def _cast(image: Image.Image) -> Image.Image:
    """A cold colour cast: less red, more blue."""
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) * [0.85, 1.0, 1.2], 0, 255).astype(np.uint8))


def _texture(seed: int, brightness: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(120, 40, (150, 200, 3)) * brightness, 0, 255).astype(np.uint8)


def test_statistics_equal_their_definition_on_real_images(shared_data):
    """image_stats is written for speed; on real images it equals the definition computed plainly, in float64."""
    files = sorted((shared_data / "ham10000" / "images").glob("*.jpg"))[:24]
    pictures = [images.decode(f.read_bytes(), S.max_image_pixels, S.max_decoded_side) for f in files]
    pixels = np.stack([images.resize(p, SIZE) for p in pictures])
    stats = drift.image_stats(pixels, [p.shape[1] for p in pictures], [p.shape[0] for p in pictures])
    for k, image in enumerate(pixels.astype(np.float64) / 255):
        means = [stats[c][k] for c in ("mean_red", "mean_green", "mean_blue")]
        assert means == pytest.approx(image.mean(axis=(0, 1)), abs=1e-9)
        grey = image @ drift.LUMA.astype(np.float64)
        laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
        assert stats["sharpness"][k] == pytest.approx(laplacian.var() / grey.var(), rel=1e-4)
    assert (stats["image_width"] == 200).all() and (stats["image_height"] == 150).all()


def test_statistics_follow_darkening_blur_and_colour():
    sharp = _texture(0)
    base = _stats([sharp])
    darker = _stats([(sharp * 0.5).astype(np.uint8)])
    blurred = _stats([np.asarray(Image.fromarray(sharp).filter(ImageFilter.GaussianBlur(2)))])
    red = _stats([np.clip(sharp * [1.3, 1.0, 0.8], 0, 255).astype(np.uint8)])
    f = {name: drift.features(s) for name, s in (("base", base), ("darker", darker), ("blurred", blurred), ("red", red))}
    assert (base["image_width"][0], base["image_height"][0]) == (200, 150)
    assert f["base"]["size"][0] == pytest.approx(np.sqrt(200 * 150))
    assert f["darker"]["brightness"][0] == pytest.approx(f["base"]["brightness"][0] / 2, rel=0.02)
    # sharpness is relative to the contrast: halving every pixel leaves it, blurring cuts it
    assert f["darker"]["sharpness"][0] == pytest.approx(f["base"]["sharpness"][0], rel=0.05)
    assert f["blurred"]["sharpness"][0] < f["base"]["sharpness"][0] / 5
    assert f["red"]["red_share"][0] > f["base"]["red_share"][0] + 0.05
    assert f["red"]["blue_share"][0] < f["base"]["blue_share"][0] - 0.03


def test_compare_psi_and_test():
    assert drift.compare([100, 100], [100, 100]) == (0.0, 1.0)
    psi, p = drift.compare([500, 500], [10, 90])
    # (0.9 - 0.5) ln(0.9/0.5) + (0.1 - 0.5) ln(0.1/0.5)
    assert psi == pytest.approx(0.4 * np.log(1.8) - 0.4 * np.log(0.2))
    assert p < 1e-10
    # the same shift in 6 images: as large, but it could be chance
    psi_small, p_small = drift.compare([500, 500], [1, 5])
    assert psi_small > 0.25 and p_small > S.drift_p_value
    # an empty bin on one side counts as half an image, not as an infinite PSI
    assert np.isfinite(drift.compare([100, 0, 100], [50, 50, 0])[0])


def test_a_constant_feature_has_bins_on_both_sides():
    edges = [173.2]
    assert drift.bin_counts(np.array([100.0, 173.2, 173.2, 256.0]), edges).tolist() == [1, 2, 1]


def test_generated_nights_quiet_when_drawn_like_validation_and_loud_when_shifted():
    pictures = [_texture(seed) for seed in range(300)]
    stats = _stats(pictures)
    reference = drift.reference(stats, _probs(300, 0), 0.5, list(CLASS_NAMES), MELANOMA)
    json.dumps(reference)  # it is stored as JSON with the model
    same = _drift(_night_rows(_stats([_texture(seed) for seed in range(1000, 1200)]), _probs(200, 1)), reference)
    assert same["alert"] is False and same["reasons"] == []
    assert max(f["psi"] for f in same["features"].values()) < 0.1

    darker = _stats([_texture(seed, 0.7) for seed in range(1000, 1200)])
    loud = _drift(_night_rows(darker, _probs(200, 1, melanoma_boost=0.6)), reference)
    assert loud["alert"] is True
    assert any(r.startswith("brightness fell: mean ") for r in loud["reasons"])
    assert any(r.startswith("melanoma risk rose") for r in loud["reasons"])
    assert any(r.startswith("share flagged rose") for r in loud["reasons"])
    assert any(r.startswith("predicted classes changed: melanoma ") for r in loud["reasons"])
    assert not loud["features"]["size"]["shifted"] and not loud["features"]["sharpness"]["shifted"]


def test_without_a_reference_or_scored_image_nothing_is_compared():
    rows = _night_rows(_stats([_texture(0)]), _probs(1, 0))
    assert _drift(rows, None) == {"alert": False, "reasons": [], "reference": None, "images": 1}
    reference = drift.reference(_stats([_texture(1), _texture(2)]), _probs(2, 0), 0.5, list(CLASS_NAMES), MELANOMA)
    failed = rows.assign(melanoma_risk=np.nan)
    assert _drift(failed, reference) == {"alert": False, "reasons": [], "reference": "v1", "images": 0}


@pytest.fixture(scope="module")
def ham(shared_data):
    """Real HAM10000 pictures, one per lesion: 300 for the reference, 200 for a night."""
    meta = pd.read_csv(shared_data / "ham10000" / "HAM10000_metadata.csv").drop_duplicates("lesion_id")
    files = [shared_data / "ham10000" / "images" / f"{i}.jpg" for i in meta.sample(500, random_state=3)["image_id"]]
    return files[:300], files[300:]


def test_real_ham_night_quiet_and_its_changed_copies_named(ham, shared_data):
    val_files, night_files = ham
    reference = drift.reference(_stats([_reencoded(f) for f in val_files]), _probs(300, 0), 0.5, list(CLASS_NAMES), MELANOMA)
    probs = _probs(len(night_files), 1)

    def night(change=None, files=night_files):
        return _drift(_night_rows(_stats([_reencoded(f, change) for f in files]), probs), reference)

    normal = night()
    assert normal["alert"] is False, normal["reasons"]
    for change, expected in (
        (lambda im: ImageEnhance.Brightness(im).enhance(0.7), "brightness fell"),
        (lambda im: im.filter(ImageFilter.GaussianBlur(1.5)), "sharpness fell"),
        (_cast, "blue share of the colour rose"),
    ):
        shifted = night(change)
        assert shifted["alert"] is True
        assert any(r.startswith(expected) for r in shifted["reasons"]), shifted["reasons"]
    labels = pd.read_csv(shared_data / "isic-extra" / "labels.csv")
    isic2020 = labels[labels["source"] == "isic2020"].sample(len(night_files), random_state=0)["image_id"]
    other = night(files=[shared_data / "isic-extra" / "images" / f"{i}.jpg" for i in isic2020])
    assert other["reasons"][0].startswith("image size rose: mean 256 px vs 173 px in validation")
