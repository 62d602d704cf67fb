"""The pictures of the HTML reports, each as a data: URI: matplotlib figures as PNG, lesion photos and
Grad-CAM overlays as JPEG thumbnails re-encoded from decoded pixels (an archive's own bytes never reach a page)."""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from PIL import Image

THUMBNAIL = 220  # pixels, long side of a lesion picture


def risk_histogram(risks: np.ndarray, threshold: float | None) -> str:
    """The night's melanoma risks on a log scale (a handful of high risks stays visible next to thousands of low
    ones), with the alert threshold and the flagged range when it is known."""
    fig = Figure(figsize=(9, 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.hist(risks, bins=np.linspace(0, 1, 51), color="#4f6bd8")
    if threshold is not None:
        ax.axvspan(threshold, 1, color="#b3261e", alpha=0.07, label="flagged")
        ax.axvline(threshold, color="#b3261e", linestyle="--", linewidth=2, label=f"alert threshold {threshold:.3f}")
        ax.legend(loc="upper right")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0.8)  # a bin of one image still shows
    ax.set_xlabel("melanoma risk")
    ax.set_ylabel("images (log scale)")
    ax.set_title(f"{len(risks)} images scored")
    return _png(fig)


def confusion_matrix(confusion: list[list[int]], classes: list[str]) -> str:
    """Counts in the cells, colour by the share of the true class's row."""
    matrix = np.asarray(confusion)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(8, 7), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(matrix.shape):
        color = "white" if rows[i, j] > 0.5 else "black"
        ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9, color=color)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (colour: share of the row)")
    return _png(fig)


def roc_curve(roc: dict | None, auc: float | None, threshold: float, at_threshold: dict) -> str:
    """Melanoma against the rest: the curve when the card has its points, and the alert threshold's operating point."""
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#9aa1b1", linestyle=":", label="chance")
    if roc is not None:
        ax.plot(roc["fpr"], roc["tpr"], color="#4f6bd8", linewidth=2, label="melanoma vs rest")
    if at_threshold.get("sensitivity") is not None and at_threshold.get("specificity") is not None:
        label = f"alert threshold {threshold:.3f}"
        ax.plot([1 - at_threshold["specificity"]], [at_threshold["sensitivity"]], "o", color="#b3261e", label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC, melanoma AUC " + ("—" if auc is None else f"{auc:.3f}"))
    ax.legend(loc="lower right")
    return _png(fig)


def loss_history(history: list[dict]) -> str:
    """Training and validation loss per epoch."""
    fig = Figure(figsize=(7, 3), dpi=100)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "val_loss"):
        ax.plot(epochs, [h.get(key) for h in history], marker="o", label=key.replace("_", " "))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    return _png(fig)


def thumbnail(picture: np.ndarray) -> str:
    """A decoded picture (HxWx3 uint8) at most THUMBNAIL pixels on its long side."""
    return _jpeg(_thumb(picture))


def heat_overlay(picture: np.ndarray, heat: np.ndarray) -> str:
    """The thumbnail with a heat map in [0, 1] stretched over all of it (the model sees the whole picture squashed
    into its square input); cool regions keep the photo as it is."""
    thumb = _thumb(picture)
    resized = Image.fromarray(heat.astype(np.float32), mode="F").resize(thumb.size, Image.Resampling.BILINEAR)
    heat = np.clip(np.asarray(resized), 0, 1)
    colored = colormaps["jet"](heat)[..., :3] * 255
    alpha = 0.6 * heat[..., None]
    blended = (1 - alpha) * np.asarray(thumb, dtype=np.float32) + alpha * colored
    return _jpeg(Image.fromarray(blended.astype(np.uint8)))


def _thumb(picture: np.ndarray) -> Image.Image:
    thumb = Image.fromarray(picture)
    thumb.thumbnail((THUMBNAIL, THUMBNAIL))
    return thumb


def _png(fig: Figure) -> str:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def drift_panel(drift: dict, labels: dict[str, str]) -> str:
    """Small multiples: each compared feature's distribution on the night (line) over the model's validation set
    (grey), drawn from their percentiles, then the predicted-class mix; a moved figure has a red title."""
    names = list(drift["features"])
    rows = -(-(len(names) + 1) // 3)
    fig = Figure(figsize=(11, 2.7 * rows), dpi=100)
    axes = fig.subplots(rows, 3, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        f = drift["features"][name]
        night, ref = np.asarray(f["percentiles"]), np.asarray(f["reference_percentiles"])
        low, high = min(night.min(), ref.min()), max(night.max(), ref.max())
        bins = np.linspace(low, high, 21) if high > low else np.linspace(low - 0.5, high + 0.5, 3)
        ax.hist(ref, bins=bins, weights=np.full(len(ref), 1 / len(ref)), color="#c5cad6", label="validation")
        ax.hist(night, bins=bins, weights=np.full(len(night), 1 / len(night)), histtype="step", linewidth=2,
                color="#4f6bd8", label="this night")  # fmt: skip
        ax.set_title(f"{labels[name]} · PSI {f['psi']:.2f}", fontsize=10, color="#b3261e" if f["shifted"] else "#1d2330")
        ax.set_yticks([])
    axes[0].legend(fontsize=8)
    mix = drift["class_mix"]
    ax = axes[len(names)]
    classes = list(mix["reference"])
    y = np.arange(len(classes))
    ax.barh(y + 0.2, [mix["reference"][c] for c in classes], height=0.4, color="#c5cad6", label="validation")
    ax.barh(y - 0.2, [mix["night"][c] for c in classes], height=0.4, color="#4f6bd8", label="this night")
    ax.set_yticks(y, classes, fontsize=7)
    ax.invert_yaxis()
    ax.set_title(f"predicted class · PSI {mix['psi']:.2f}", fontsize=10, color="#b3261e" if mix["shifted"] else "#1d2330")
    for ax in axes[len(names) + 1 :]:
        ax.set_axis_off()
    return _png(fig)
