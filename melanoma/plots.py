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
