"""Drift watch: does tonight's archive look like the images the model was validated on (docs/drift.md)?

  image_stats     per image, from the decoded pixels: decoded width and height, mean of each channel and
                  sharpness, computed on the model-sized image (what the model sees); scoring keeps them as columns
  reference       at publish time, from the validation split: binned distributions of each feature and of the
                  melanoma risk, the flagged share and the predicted-class mix (stored with the model, REFERENCE_FILE)
  night_drift     at the end of a night: each figure of the night against the reference, by population stability
                  index (PSI, how far) and a chi-square test of homogeneity (not sampling noise), with one readable
                  line per figure that moved

A figure has moved when its PSI is at least Settings.drift_psi and the test's p-value is below
Settings.drift_p_value: the PSI alone alerts on small nights by chance, the test alone on tiny differences in
large nights.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from melanoma import layout, registry

REFERENCE_FILE = "drift_reference.json"
STAT_COLUMNS = tuple(layout.IMAGE_STATS)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 weights of R, G, B
DECILES = np.linspace(0.1, 0.9, 9)
PERCENTILES = np.linspace(0, 100, 51)  # the shape of each distribution, for the report's histograms
# feature -> (what a reason calls it, decimals and unit its values read with)
FEATURES = {
    "size": ("image size", (0, " px")),
    "brightness": ("brightness", (3, "")),
    "red_share": ("red share of the colour", (3, "")),
    "blue_share": ("blue share of the colour", (3, "")),
    "sharpness": ("sharpness", (3, "")),
    "melanoma_risk": ("melanoma risk", (3, "")),
}


def image_stats(pixels: np.ndarray, widths, heights) -> dict[str, np.ndarray]:
    """The STAT_COLUMNS of a batch of model-sized images (N x S x S x 3 uint8) decoded at widths x heights.
    Sharpness is the variance of the Laplacian of the grey image over the variance of the grey image: blur lowers
    it, while darkening or a change of contrast, which scale both, leave it as it was."""
    n, height, width, _ = pixels.shape
    # Written for speed (a tenth of a scoring actor's CPU per image otherwise): channel sums over whole rows first,
    # exact in integers; grey level from the uint8 channels without a float copy of the image.
    sums = pixels.reshape(n, height, width * 3).sum(axis=1, dtype=np.uint32).reshape(n, width, 3).sum(axis=1)
    means = sums / float(height * width * 255)
    weights = LUMA / np.float32(255)
    grey = pixels[..., 0] * weights[0]
    grey += pixels[..., 1] * weights[1]
    grey += pixels[..., 2] * weights[2]
    laplacian = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1]
    laplacian += grey[:, 1:-1, :-2]
    laplacian += grey[:, 1:-1, 2:]
    laplacian -= 4 * grey[:, 1:-1, 1:-1]
    sharpness = laplacian.var(axis=(1, 2)) / np.maximum(grey.var(axis=(1, 2)), 1e-6)
    return {
        "image_width": np.asarray(widths, dtype=np.int32),
        "image_height": np.asarray(heights, dtype=np.int32),
        "mean_red": means[:, 0].astype(np.float64),
        "mean_green": means[:, 1].astype(np.float64),
        "mean_blue": means[:, 2].astype(np.float64),
        "sharpness": sharpness.astype(np.float64),
    }


def features(stats) -> dict[str, np.ndarray]:
    """The compared image features from the STAT_COLUMNS (a dict of arrays or a DataFrame): size is the side of the
    square of the same area, brightness the mean luma, colour the shares of red and of blue in the channel sum."""
    red, green, blue = (np.asarray(stats[c], dtype=np.float64) for c in ("mean_red", "mean_green", "mean_blue"))
    total = np.maximum(red + green + blue, 1e-6)
    width, height = (np.asarray(stats[c], dtype=np.float64) for c in ("image_width", "image_height"))
    return {
        "size": np.sqrt(width * height),
        "brightness": LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue,
        "red_share": red / total,
        "blue_share": blue / total,
        "sharpness": np.asarray(stats["sharpness"], dtype=np.float64),
    }


def reference(stats: dict[str, np.ndarray], probs: np.ndarray, threshold: float, class_names: list[str], positive: str) -> dict:
    """The validation figures a night is compared with: stats and calibrated probabilities of the same images."""
    risk = probs[:, class_names.index(positive)]
    predicted = np.bincount(probs.argmax(axis=1), minlength=len(class_names))
    return {
        "images": len(risk),
        "features": {name: _distribution(v) for name, v in (features(stats) | {"melanoma_risk": risk}).items()},
        "flagged": int((risk >= threshold).sum()),
        "classes": {c: int(k) for c, k in zip(class_names, predicted)},
    }


def read_reference(version_dir: str, card: dict) -> dict | None:
    """The reference published with a model version (verified against its card); None for a version without one."""
    data = registry.read_extra(version_dir, card, REFERENCE_FILE)
    return None if data is None else json.loads(data)


def night_drift(rows: pd.DataFrame, reference: dict | None, reference_version: str | None, psi_alert: float, p_alert: float) -> dict:
    """The night's figures against the reference. rows: the night's scored rows (STAT_COLUMNS, melanoma_risk,
    flagged, predicted_class). Without a reference, or without a scored image, nothing is compared."""
    rows = rows[rows["melanoma_risk"].notna()]
    quiet = {"alert": False, "reasons": [], "reference": reference_version if reference else None, "images": len(rows)}
    if reference is None or rows.empty:
        return quiet
    values = features(rows) | {"melanoma_risk": rows["melanoma_risk"].to_numpy(np.float64)}
    figures = {name: _feature(values[name], ref, psi_alert, p_alert) for name, ref in reference["features"].items()}
    flagged = _flagged(rows["flagged"].to_numpy(bool), reference, psi_alert, p_alert)
    classes = _classes(rows["predicted_class"], reference["classes"], psi_alert, p_alert)
    reasons = [_feature_reason(name, f) for name, f in figures.items() if f["shifted"]]
    reasons += [_flagged_reason(flagged)] if flagged["shifted"] else []
    reasons += [_classes_reason(classes)] if classes["shifted"] else []
    return quiet | {
        "alert": bool(reasons),
        "reasons": reasons,
        "reference_images": reference["images"],
        "thresholds": {"psi": psi_alert, "p_value": p_alert},
        "features": figures,
        "flagged_share": flagged,
        "class_mix": classes,
    }


def compare(reference_counts, night_counts) -> tuple[float, float]:
    """(PSI, p-value of a chi-square test of homogeneity) of two histograms over the same bins. Bins empty on both
    sides are dropped; an empty bin on one side counts as half an image there (the PSI of an empty bin is infinite)."""
    from scipy.stats import chi2_contingency  # here, not at the top: every scoring actor imports this module

    ref, night = np.asarray(reference_counts, dtype=np.float64), np.asarray(night_counts, dtype=np.float64)
    kept = (ref + night) > 0
    ref, night = ref[kept], night[kept]
    if len(ref) < 2:
        return 0.0, 1.0
    p = np.maximum(ref, 0.5) / ref.sum()
    q = np.maximum(night, 0.5) / night.sum()
    psi = float(np.sum((q - p) * np.log(q / p)))
    return psi, float(chi2_contingency(np.stack([ref, night])).pvalue)


def bin_counts(values: np.ndarray, edges) -> np.ndarray:
    """Counts in the bins between the edges, each edge a bin of its own: a feature that is one value on every
    validation image (all photos of one size) still has a bin below it, at it, and above it."""
    edges = np.asarray(edges, dtype=np.float64)
    index = np.searchsorted(edges, values, "left") + np.searchsorted(edges, values, "right")
    return np.bincount(index, minlength=2 * len(edges) + 1)


def _distribution(values: np.ndarray) -> dict:
    edges = np.unique(np.quantile(values, DECILES))
    return {
        "edges": edges.tolist(),
        "counts": bin_counts(values, edges).tolist(),
        "mean": float(values.mean()),
        "percentiles": _rounded(np.percentile(values, PERCENTILES)),
    }


def _feature(values: np.ndarray, ref: dict, psi_alert: float, p_alert: float) -> dict:
    psi, p_value = compare(ref["counts"], bin_counts(values, ref["edges"]))
    return {
        "psi": round(psi, 4), "p_value": p_value, "shifted": psi >= psi_alert and p_value < p_alert,
        "mean": float(values.mean()), "reference_mean": ref["mean"],
        "percentiles": _rounded(np.percentile(values, PERCENTILES)), "reference_percentiles": ref["percentiles"],
    }  # fmt: skip


def _flagged(flagged: np.ndarray, reference: dict, psi_alert: float, p_alert: float) -> dict:
    ref_flagged = reference["flagged"]
    psi, p_value = compare([reference["images"] - ref_flagged, ref_flagged], [len(flagged) - flagged.sum(), flagged.sum()])
    return {
        "night": float(flagged.mean()), "reference": ref_flagged / reference["images"],
        "psi": round(psi, 4), "p_value": p_value, "shifted": psi >= psi_alert and p_value < p_alert,
    }  # fmt: skip


def _classes(predicted: pd.Series, ref_counts: dict[str, int], psi_alert: float, p_alert: float) -> dict:
    names = list(ref_counts)
    night_counts = predicted.value_counts().reindex(names, fill_value=0).to_numpy()
    psi, p_value = compare(list(ref_counts.values()), night_counts)
    ref_total = max(sum(ref_counts.values()), 1)
    return {
        "night": {c: float(k / len(predicted)) for c, k in zip(names, night_counts)},
        "reference": {c: k / ref_total for c, k in ref_counts.items()},
        "psi": round(psi, 4), "p_value": p_value, "shifted": psi >= psi_alert and p_value < p_alert,
    }  # fmt: skip


def _feature_reason(name: str, f: dict) -> str:
    """A distribution can move while its mean barely does: the means get the decimals it takes to tell them apart."""
    label, (decimals, unit) = FEATURES[name]
    decimals = next((d for d in range(decimals, decimals + 4) if round(f["mean"], d) != round(f["reference_mean"], d)), decimals)
    night, ref = (f"{v:.{decimals}f}{unit}" for v in (f["mean"], f["reference_mean"]))
    moved = "rose" if f["mean"] > f["reference_mean"] else "fell" if f["mean"] < f["reference_mean"] else "changed shape"
    return f"{label} {moved}: mean {night} vs {ref} in validation (PSI {f['psi']:.2f})"


def _flagged_reason(f: dict) -> str:
    moved = "rose" if f["night"] > f["reference"] else "fell"
    return f"share flagged {moved}: {f['night']:.1%} vs {f['reference']:.1%} in validation (PSI {f['psi']:.2f})"


def _classes_reason(f: dict) -> str:
    """Names the two classes whose shares moved most."""
    moved = sorted(f["night"], key=lambda c: -abs(f["night"][c] - f["reference"][c]))[:2]
    shares = ", ".join(f"{c} {f['night'][c]:.0%} vs {f['reference'][c]:.0%}" for c in moved)
    return f"predicted classes changed: {shares} in validation (PSI {f['psi']:.2f})"


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{v:.4g}") for v in values]
