"""HTML reports for people: the morning report of one night's scores for the dermatologist, and the model card.

Each report is ONE self-contained file: pictures are data: URIs, the style is inline, there is no script, and a
Content-Security-Policy forbids loading anything else, so it can be mailed or archived as it is and opening it
never calls out. Every string that comes from data (file names, class names, error messages, card fields) is
HTML-escaped: an archive may well hold a file named `<script>...jpg`. Archive images are decoded by
images.decode and re-encoded as JPEG thumbnails; their own bytes never reach the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from datetime import datetime, timezone

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from PIL import Image

from melanoma import archive, images, query, registry, storage
from melanoma.config import MELANOMA, settings
from melanoma.score import SUMMARY, partition

log = logging.getLogger(__name__)

THUMBNAIL = 220  # pixels, long side of a lesion picture
MAX_ERRORS_SHOWN = 100
CARD_FACTS = (
    "arch", "created_at", "data_uri", "train_images", "val_images", "epochs_run", "training_seconds", "run_name", "model_sha256",
)  # fmt: skip
SUMMARY_FACTS = (
    "input_uri", "inputs_listed", "other_files_skipped", "scored_this_run", "wall_seconds", "images_per_second", "finished_at",
)  # fmt: skip
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, Arial, sans-serif; margin: 24px; color: #1d2330; max-width: 1150px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #d8dce4; padding-bottom: 4px; }
.sub { color: #5a6275; margin: 0 0 12px; }
.note { background: #fff6dd; border-left: 4px solid #e0a800; padding: 8px 12px; margin: 10px 0; }
table { border-collapse: collapse; font-size: 14px; margin-bottom: 14px; }
td, th { padding: 4px 10px; border-bottom: 1px solid #e6e8ee; text-align: left; vertical-align: top; }
th { background: #f3f5f9; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.kpis { display: flex; gap: 12px; flex-wrap: wrap; }
.kpi { border: 1px solid #d8dce4; border-radius: 8px; padding: 8px 16px; min-width: 110px; }
.kpi b { display: block; font-size: 24px; }
.kpi.alert b { color: #b3261e; }
.lesions { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 14px; }
.lesion { border: 1px solid #d8dce4; border-radius: 8px; padding: 10px; }
.lesion.wide { grid-column: span 2; }
.pics { display: flex; gap: 8px; }
.pics figure { margin: 0; font-size: 12px; color: #5a6275; }
.pics img { display: block; max-width: 100%; border-radius: 4px; }
.missing { width: 200px; height: 150px; background: #f3f5f9; color: #7a8294; font-size: 12px; padding: 8px; }
.rank { color: #5a6275; font-size: 13px; }
.risk { font-size: 20px; font-weight: 700; color: #b3261e; }
.id { font-family: ui-monospace, monospace; font-size: 13px; word-break: break-all; }
.uri { color: #7a8294; font-size: 11px; word-break: break-all; }
.probs { width: 100%; font-size: 12px; }
.probs td { padding: 1px 4px; border: 0; }
.bar { background: #e6e8ee; width: 70px; height: 8px; border-radius: 4px; }
.bar div { background: #4f6bd8; height: 8px; border-radius: 4px; }
.probs tr.mel td { color: #b3261e; font-weight: 600; }
.probs tr.mel .bar div { background: #b3261e; }
footer { margin-top: 32px; color: #7a8294; font-size: 12px; }
"""


def morning_report(
    scores_uri: str, run_date: str, out_path: str, model_uri: str | None = None, top: int = 100, heatmaps: int = 5
) -> dict:
    """One night's report: the `top` riskiest flagged lesions (the first `heatmaps` with a Grad-CAM heatmap), the risk
    histogram with the alert threshold, the run's counts and errors.

    The model (for heatmaps and the threshold) is model_uri, else the run summary's model_uri when it has one; it
    must be the version that scored the night. Without one the report shows everything else. Returns what it drew.
    """
    run_date = query.iso_date(run_date)
    flagged = query.query(scores_uri, date=run_date, flagged=True, top=top).to_pylist()  # also refuses an unknown night
    night = f"WHERE run_date = DATE '{run_date}'"
    counts = query.sql(
        scores_uri,
        "SELECT model_version, count(*) AS images, count(*) FILTER (WHERE error IS NULL) AS scored, "
        f"count(*) FILTER (WHERE error IS NOT NULL) AS errors, count(*) FILTER (WHERE flagged) AS flagged FROM scores {night} "
        "GROUP BY model_version ORDER BY model_version",
    ).to_pylist()
    risks = query.sql(scores_uri, f"SELECT melanoma_risk FROM scores {night} AND error IS NULL").column(0).to_numpy()
    errors = query.query(scores_uri, date=run_date, errors=True, top=MAX_ERRORS_SHOWN).to_pylist()
    summary = _summary(scores_uri, run_date)
    versions = [c["model_version"] for c in counts]
    total = {k: sum(c[k] for c in counts) for k in ("images", "scored", "errors", "flagged")}

    notes = []
    model_uri = model_uri or summary.get("model_uri")
    card = registry.read_card(model_uri) if model_uri else None
    if card is None:
        notes.append("No model given (--model): no heatmaps, and no alert threshold in the histogram.")
    elif card["version"] not in versions:
        scored_with = ", ".join(versions)
        notes.append(f"The model given is {card['version']}, but the night was scored with {scored_with}: "
                     "no heatmaps, no threshold.")
        card = None
    heat_of = _grad_cam(registry.load(model_uri)) if card and heatmaps > 0 else None
    lesions, drawn = _lesions(flagged, heat_of, card["version"] if card else None, heatmaps)
    body = [
        f"<h1>Melanoma risk: night of {_e(run_date)}</h1>",
        f'<p class="sub">Scores {_e(partition(scores_uri, run_date))} &middot; model {_e(", ".join(versions))}</p>',
        *(f'<p class="note">{_e(n)}</p>' for n in notes),
        '<section id="summary"><div class="kpis">',
        f'<div class="kpi alert">flagged<b>{total["flagged"]}</b></div>',
        *(f'<div class="kpi">{k}<b>{total[k]}</b></div>' for k in ("scored", "errors", "images")),
        "</div></section>",
        '<section id="flagged"><h2>Flagged lesions, highest risk first</h2>',
        f'<p class="sub">{_flagged_caption(total["flagged"], len(lesions), drawn, card, scores_uri, run_date)}</p>',
        f'<div class="lesions">{"".join(lesions)}</div>' if lesions else "<p>No lesion was flagged this night.</p>",
        "</section>",
        '<section id="distribution"><h2>Risk distribution</h2>',
        _img("risk-histogram", _histogram(risks, card), "Histogram of melanoma risk with the alert threshold"),
        "</section>",
        '<section id="run"><h2>Run</h2>',
        _table(["model version", "images", "scored", "errors", "flagged"], [list(c.values()) for c in counts]),
        _facts(summary),
        "</section>",
        f'<section id="errors"><h2>Images that could not be scored ({total["errors"]})</h2>',
        _table(["image", "reason"], [[r["image_uri"], r["error"]] for r in errors]) if errors else "<p>None.</p>",
        f"<p class=\"sub\">The first {MAX_ERRORS_SHOWN} are listed.</p>" if total["errors"] > MAX_ERRORS_SHOWN else "",
        "</section>",
        "<footer>Melanoma risk is a model output to order the review, not a diagnosis. "
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by melanoma-scoring.</footer>",
    ]
    storage.write_bytes(out_path, _page(f"Melanoma risk {run_date}", body).encode())
    log.info("report of %s: %d flagged, %d shown, %d heatmaps -> %s", run_date, total["flagged"], len(lesions), drawn, out_path)
    return {"path": out_path, "run_date": run_date, "shown": len(lesions), "heatmaps": drawn, **total}


def model_card_report(model_uri: str, out_path: str) -> dict:
    """The model card as a page: what was trained on what, the validation metrics, calibration, confusion matrix, ROC."""
    card = registry.read_card(model_uri)
    m, c = card.get("metrics", {}), card.get("calibration", {})
    classes = card["class_names"]
    per_class = m.get("per_class", {})
    body = [
        f"<h1>Model card: {_e(card['version'])}</h1>",
        f'<p class="sub">{_e(registry.resolve(model_uri))}</p>',
        '<section id="headline"><div class="kpis">',
        *(
            f'<div class="kpi">{label}<b>{_e(_fmt(value))}</b></div>'
            for label, value in (
                ("melanoma AUC", m.get("melanoma_auc")),
                ("balanced accuracy", m.get("balanced_accuracy")),
                ("accuracy", m.get("accuracy")),
                ("alert threshold", card["alert_threshold"]),
            )
        ),
        "</div></section>",
        '<section id="model"><h2>Model</h2>',
        _table(["field", "value"], [[k.replace("_", " "), card[k]] for k in CARD_FACTS if k in card]
               + [[f"{k} version", v] for k, v in card.get("libraries", {}).items()]),
        "</section>",
        '<section id="calibration"><h2>Alert threshold and calibration (validation split)</h2>',
        _table(["measure", "value"], [
            ["temperature", card["temperature"]],
            ["alert threshold (melanoma risk)", card["alert_threshold"]],
            ["target sensitivity", c.get("target_sensitivity")],
            ["sensitivity at the threshold", c.get("at_threshold", {}).get("sensitivity")],
            ["specificity at the threshold", c.get("at_threshold", {}).get("specificity")],
            ["share of images flagged", c.get("at_threshold", {}).get("flagged_fraction")],
            ["sensitivity, threshold fitted on the other half", c.get("held_out", {}).get("sensitivity")],
            ["specificity, threshold fitted on the other half", c.get("held_out", {}).get("specificity")],
            ["calibration error (ECE) before / after", f"{_fmt(c.get('ece_before'))} / {_fmt(c.get('ece_after'))}"],
        ]),
        "</section>",
        '<section id="per-class"><h2>Per class</h2>',
        _table(["class", "support", "recall", "precision"], [
            [name, *(per_class.get(name, {}).get(k) for k in ("support", "recall", "precision"))] for name in classes
        ]),
        "</section>",
        '<section id="plots"><h2>Confusion matrix and ROC curve</h2>',
        _img("confusion-matrix", _confusion(m["confusion_matrix"], classes), "Confusion matrix") if "confusion_matrix" in m
        else '<p class="note">The card has no confusion matrix.</p>',
        _img("roc-curve", _roc(card), "ROC curve of melanoma against the rest"),
        "" if "roc" in m else '<p class="note">The card has no ROC points (metrics.roc): only the alert threshold is drawn.</p>',
        "</section>",
    ]
    if card.get("history"):
        body += ['<section id="training"><h2>Training</h2>', _img("history", _history(card["history"]), "Loss"), "</section>"]
    storage.write_bytes(out_path, _page(f"Model card {card['version']}", body).encode())
    log.info("model card of %s -> %s", card["version"], out_path)
    return {"path": out_path, "version": card["version"]}


# ---------------------------------------------------------------- lesions and Grad-CAM


def _lesions(rows: list[dict], heat_of, version: str | None, heatmaps: int) -> tuple[list[str], int]:
    """HTML of one card per flagged row, and how many got a heatmap (only rows scored by the model's version)."""
    s = settings()
    shards: dict[str, dict[str, dict]] = {}
    cards, drawn = [], 0
    for rank, row in enumerate(rows, 1):
        try:
            picture = images.decode(_read_image(row["image_uri"], shards), s.max_image_pixels, s.max_decoded_side)
            pics = [("photo", _thumbnail(picture), "thumb")]
            if heat_of is not None and drawn < heatmaps and row["model_version"] == version:
                heat = heat_of(picture)
                raised = "red raised the melanoma risk" if heat.max() > 0 else "no region raised the melanoma risk"
                pics.append((f"Grad-CAM: {raised}", _overlay(picture, heat), "heatmap"))
                drawn += 1
        except (storage.StorageError, images.ImageError) as exc:
            log.warning("%s: no picture for the report: %s", row["image_uri"], exc)
            pics = [(f"picture not readable: {exc}", None, "missing")]
        cards.append(_lesion_card(rank, row, pics))
    return cards, drawn


def _read_image(image_uri: str, shards: dict[str, dict[str, dict]]) -> bytes:
    """Bytes of a scored image: a loose file, or a `<shard>.tar#<member>` located by listing its shard once."""
    shard_uri, tar, _ = image_uri.partition(".tar#")
    if not tar:
        return archive.fetch(image_uri, None, None, None)
    shard_uri += ".tar"
    if shard_uri not in shards:
        members, _ = archive.list_inputs(shard_uri)
        shards[shard_uri] = {r["image_uri"]: r for r in members.to_dict("records")}
    row = shards[shard_uri].get(image_uri)
    if row is None:
        raise storage.StorageError(f"{image_uri}: no such member in the shard")
    return archive.fetch(row["image_uri"], row["shard_uri"], row["offset"], row["size"])


def _grad_cam(loaded: registry.LoadedModel):
    """picture -> Grad-CAM (Selvaraju et al. 2017) of the melanoma probability, HxW in [0, 1] over the model input,
    from the last layer with a 4-D output (the last convolutional feature map, before global pooling or flatten).
    For an ensemble, the mean of its members' maps: its probability is the mean of theirs."""
    import keras
    import tensorflow as tf

    size = loaded.card.get("input_size", [settings().image_size])[0]
    positive = loaded.class_names.index(loaded.card.get("positive_class", MELANOMA))
    members = [layer for layer in loaded.model.layers if isinstance(layer, keras.Model)] or [loaded.model]
    cam_models = [keras.Model(m.inputs, [_feature_layer(m).output, m.output]) for m in members]

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


def _feature_layer(model):
    import keras

    for layer in reversed(model.layers):
        if len(layer.output.shape) == 4 and not isinstance(layer, keras.layers.InputLayer):
            return layer
    raise registry.ModelError(f"model {model.name} has no layer with a 4-D output for Grad-CAM")


def _overlay(picture: np.ndarray, cam: np.ndarray) -> str:
    """The heat map stretched over the whole picture (the model sees the whole image squashed), as a data URI."""
    thumb = Image.fromarray(picture)
    thumb.thumbnail((THUMBNAIL, THUMBNAIL))
    heat = Image.fromarray(cam.astype(np.float32), mode="F").resize(thumb.size, Image.Resampling.BILINEAR)
    heat = np.clip(np.asarray(heat), 0, 1)
    colored = colormaps["jet"](heat)[..., :3] * 255
    alpha = 0.6 * heat[..., None]  # cool regions keep the photo as it is
    blended = ((1 - alpha) * np.asarray(thumb, dtype=np.float32) + alpha * colored).astype(np.uint8)
    return _jpeg(Image.fromarray(blended))


def _thumbnail(picture: np.ndarray) -> str:
    thumb = Image.fromarray(picture)
    thumb.thumbnail((THUMBNAIL, THUMBNAIL))
    return _jpeg(thumb)


def _lesion_card(rank: int, row: dict, pics: list[tuple[str, str | None, str]]) -> str:
    figures = "".join(
        f'<figure><img class="{kind}" src="{uri}" alt="{_e(caption)}">{_e(caption) if kind == "heatmap" else ""}</figure>'
        if uri
        else f'<figure><div class="missing">{_e(caption)}</div></figure>'
        for caption, uri, kind in pics
    )
    # p_<snake_case class> columns back to class names (every class name is lower case words)
    probs = [(k[2:].replace("_", " "), v) for k, v in row.items() if k.startswith("p_") and v is not None]
    probs.sort(key=lambda c: -c[1])
    bars = "".join(
        f'<tr class="{"mel" if name == MELANOMA else ""}"><td>{_e(name)}</td><td class="num">{100 * p:.1f}%</td>'
        f'<td><div class="bar"><div style="width:{100 * p:.0f}%"></div></div></td></tr>'
        for name, p in probs
    )
    wide = " wide" if len(pics) > 1 else ""
    return (
        f'<article class="lesion{wide}" id="lesion-{rank}"><div class="pics">{figures}</div>'
        f'<div class="rank">#{rank} &middot; predicted {_e(row["predicted_class"])}</div>'
        f'<div class="risk">{100 * row["melanoma_risk"]:.1f}% melanoma risk</div>'
        f'<div class="id">{_e(row["image_id"])}</div><table class="probs">{bars}</table>'
        f'<div class="uri">{_e(row["image_uri"])}</div></article>'
    )


def _flagged_caption(flagged: int, shown: int, drawn: int, card: dict | None, scores_uri: str, run_date: str) -> str:
    text = f"{flagged} flagged"
    if card:
        text += f" (melanoma risk at or above {_fmt(card['alert_threshold'])})"
    if shown < flagged:
        text += f"; the {shown} highest are shown (all of them: melanoma query {scores_uri} --date {run_date} --flagged)"
    if drawn:
        text += f"; the first {drawn} with a Grad-CAM heatmap of where the model looked"
    return _e(text) + "."


# ---------------------------------------------------------------- plots


def _histogram(risks: np.ndarray, card: dict | None) -> str:
    fig = Figure(figsize=(9, 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.hist(risks, bins=np.linspace(0, 1, 51), color="#4f6bd8")
    if card is not None:
        threshold = card["alert_threshold"]
        ax.axvspan(threshold, 1, color="#b3261e", alpha=0.07, label="flagged")
        ax.axvline(threshold, color="#b3261e", linestyle="--", linewidth=2, label=f"alert threshold {threshold:.3f}")
        ax.legend(loc="upper right")
    ax.set_yscale("log")  # a handful of high risks stays visible next to thousands of low ones
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0.8)  # a bin of one image still shows
    ax.set_xlabel("melanoma risk")
    ax.set_ylabel("images (log scale)")
    ax.set_title(f"{len(risks)} images scored")
    fig.tight_layout()
    return _png(fig)


def _confusion(confusion: list[list[int]], classes: list[str]) -> str:
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
    fig.tight_layout()
    return _png(fig)


def _roc(card: dict) -> str:
    m = card.get("metrics", {})
    at = card.get("calibration", {}).get("at_threshold", {})
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#9aa1b1", linestyle=":", label="chance")
    if "roc" in m:
        ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], color="#4f6bd8", linewidth=2, label="melanoma vs rest")
    if at.get("sensitivity") is not None and at.get("specificity") is not None:
        label = f"alert threshold {card['alert_threshold']:.3f}"
        ax.plot([1 - at["specificity"]], [at["sensitivity"]], "o", color="#b3261e", label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, melanoma AUC {_fmt(m.get('melanoma_auc'))}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _history(history: list[dict]) -> str:
    fig = Figure(figsize=(7, 3), dpi=100)
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "val_loss"):
        ax.plot(epochs, [h.get(key) for h in history], marker="o", label=key.replace("_", " "))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- HTML


def _summary(scores_uri: str, run_date: str) -> dict:
    """The run summary score.py writes last; {} when the run did not finish (the rows are still reported)."""
    uri = storage.join(partition(scores_uri, run_date), SUMMARY)
    if not storage.exists(uri):
        log.warning("%s: no run summary (the run did not finish?)", uri)
        return {}
    try:
        return json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s: run summary is not valid JSON", uri)
        return {}


def _facts(summary: dict) -> str:
    rows = [[k.replace("_", " "), summary[k]] for k in SUMMARY_FACTS if k in summary]
    return _table(["run summary", ""], rows) if rows else '<p class="note">No run summary (_summary.json) for this night.</p>'


def _page(title: str, body: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    cells = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"


def _cell(value) -> str:
    if isinstance(value, (int, float)):
        return f'<td class="num">{_fmt(value)}</td>'
    return f"<td>{_e(_fmt(value))}</td>"


def _img(element_id: str, uri: str, alt: str) -> str:
    return f'<img id="{element_id}" src="{uri}" alt="{_e(alt)}">'


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
