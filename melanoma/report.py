"""HTML reports for people: the morning report of one night's scores for the dermatologist, and the model card.

Each report is ONE self-contained file (melanoma/templates): pictures are data: URIs, the style is inline, there is
no script, and a Content-Security-Policy forbids loading anything else, so it can be mailed or archived as it is
and opening it never calls out. Jinja2 autoescapes every value, so a string from data (file names, class names,
error messages, card fields) never becomes markup: an archive may well hold a file named `<script>...jpg`.
Archive images are read as scoring reads them (archive.fetch_uris), decoded by images.decode and re-encoded as
JPEG thumbnails; their own bytes never reach the page.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import numpy as np

from melanoma import archive, drift, gradcam, images, layout, plots, query, registry, storage
from melanoma.config import MELANOMA, Settings, settings

log = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 100
MAX_MISSED_SHOWN = 100
MAX_NIGHTS_SHOWN = 30
CARD_FACTS = (
    "arch", "created_at", "data_uri", "train_images", "val_images", "epochs_run", "training_seconds", "run_name", "model_sha256",
)  # fmt: skip
SUMMARY_FACTS = (
    "input_uri", "inputs_listed", "other_files_skipped", "scored_this_run", "wall_seconds", "images_per_second", "finished_at",
)  # fmt: skip


def morning_report(
    scores_uri: str, run_date: str, out_path: str, model_uri: str | None = None, top: int = 100, heatmaps: int = 5,
    outcomes_uri: str | None = None,
) -> dict:
    """One night's report: the `top` riskiest flagged lesions (the first `heatmaps` with a Grad-CAM heatmap), the risk
    histogram with the alert threshold, the night's drift against the model's validation set (an alert on top when
    it moved), the run's counts and errors; with an outcome store, the confirmed diagnoses of the nights up to this
    one: the missed melanomas and the realised figures.

    The model (for heatmaps and the threshold) is model_uri, else the run summary's model_uri when it has one; it
    must be the version that scored the night. Without one the report shows everything else. Returns what it drew.
    """
    run_date = query.iso_date(run_date)
    flagged = query.query(scores_uri, date=run_date, flagged=True, top=top).to_pylist()  # also refuses an unknown night
    counts = query.night_counts(scores_uri, run_date).to_pylist()
    risks = query.night_risks(scores_uri, run_date).column("melanoma_risk").to_numpy()
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
        notes.append(f"The model given is {card['version']}, but the night was scored with {', '.join(versions)}: "
                     "no heatmaps, no threshold.")
        card = None
    heat_of = gradcam.grad_cam(registry.load(model_uri)) if card and heatmaps > 0 else None
    lesions, drawn = _lesions(flagged, heat_of, card["version"] if card else None, heatmaps)
    threshold = card["alert_threshold"] if card else None
    _render("morning.html.j2", out_path,
        title=f"Melanoma risk {run_date}",
        run_date=run_date,
        partition=layout.partition(scores_uri, run_date),
        versions=versions,
        notes=notes,
        total=total,
        caption=_flagged_caption(total["flagged"], len(lesions), drawn, threshold, scores_uri, run_date),
        lesions=lesions,
        histogram=plots.risk_histogram(risks, threshold),
        drift=summary.get("drift"),
        drift_panel=_drift_panel(summary.get("drift")),
        drift_rows=_drift_rows(summary.get("drift")),
        counts=[list(c.values()) for c in counts],
        summary=[[k.replace("_", " "), summary[k]] for k in SUMMARY_FACTS if k in summary],
        errors=[[r["image_uri"], r["error"]] for r in errors],
        outcomes=_outcomes(scores_uri, outcomes_uri, run_date) if outcomes_uri else None,
    )  # fmt: skip
    return {"path": out_path, "run_date": run_date, "shown": len(lesions), "heatmaps": drawn, **total}


def _outcomes(scores_uri: str, outcomes_uri: str, run_date: str) -> dict:
    """The confirmed diagnoses of the nights up to run_date: missed melanomas (newest night first, at most
    MAX_MISSED_SHOWN) and the realised figures (the newest MAX_NIGHTS_SHOWN nights, then per model version)."""
    missed, figures = query.realised(scores_uri, outcomes_uri, until=run_date)
    rows = figures.to_pylist()
    nightly = [r for r in rows if r["run_date"] is not None][-MAX_NIGHTS_SHOWN:][::-1]
    columns = ("model_version", "confirmed", "melanomas", "flagged", "missed", "sensitivity", "specificity", "auc")
    return {
        "uri": outcomes_uri,
        "missed_total": missed.num_rows,
        "missed": [[str(r["run_date"]), r["image_id"], r["melanoma_risk"], r["diagnosis"] or MELANOMA, str(r["confirmed_on"]),
                    r["note"], r["image_uri"]] for r in missed.to_pylist()[:MAX_MISSED_SHOWN]],  # fmt: skip
        "figures": [[str(r["run_date"]) if r["run_date"] else "all nights", *(r[c] for c in columns)]
                    for r in nightly + [r for r in rows if r["run_date"] is None]],  # fmt: skip
    }


def model_card_report(model_uri: str, out_path: str) -> dict:
    """The model card as a page: what was trained on what, the validation metrics, calibration, confusion matrix, ROC."""
    card = registry.read_card(model_uri)
    m, c = card.get("metrics", {}), card.get("calibration", {})
    at, held_out, per_class = c.get("at_threshold", {}), c.get("held_out", {}), m.get("per_class", {})
    _render("card.html.j2", out_path,
        title=f"Model card {card['version']}",
        card=card,
        uri=registry.resolve(model_uri),
        headline=[
            ("melanoma AUC", m.get("melanoma_auc")),
            ("balanced accuracy", m.get("balanced_accuracy")),
            ("accuracy", m.get("accuracy")),
            ("alert threshold", card["alert_threshold"]),
        ],
        facts=[[k.replace("_", " "), card[k]] for k in CARD_FACTS if k in card]
        + [[f"{k} version", v] for k, v in card.get("libraries", {}).items()],
        calibration=[
            ["temperature", card["temperature"]],
            ["alert threshold (melanoma risk)", card["alert_threshold"]],
            ["target sensitivity", c.get("target_sensitivity")],
            ["sensitivity at the threshold", at.get("sensitivity")],
            ["specificity at the threshold", at.get("specificity")],
            ["share of images flagged", at.get("flagged_fraction")],
            ["sensitivity, threshold fitted on the other half", held_out.get("sensitivity")],
            ["specificity, threshold fitted on the other half", held_out.get("specificity")],
            ["calibration error (ECE) before / after", f"{_fmt(c.get('ece_before'))} / {_fmt(c.get('ece_after'))}"],
        ],
        per_class=[
            [name, *(per_class.get(name, {}).get(k) for k in ("support", "recall", "precision"))]
            for name in card["class_names"]
        ],
        confusion=plots.confusion_matrix(m["confusion_matrix"], card["class_names"]) if "confusion_matrix" in m else None,
        roc=plots.roc_curve(m.get("roc"), m.get("melanoma_auc"), card["alert_threshold"], at),
        has_roc_points="roc" in m,
        history=plots.loss_history(card["history"]) if card.get("history") else None,
    )  # fmt: skip
    return {"path": out_path, "version": card["version"]}


def _lesions(rows: list[dict], heat_of, version: str | None, heatmaps: int) -> tuple[list[dict], int]:
    """One card per flagged row (rank, row, pictures, class probabilities), and how many got a heatmap: only rows
    scored by the model's version, and at most `heatmaps`."""
    cards, drawn = [], 0
    for rank, (row, picture) in enumerate(zip(rows, _pictures(rows)), 1):
        if isinstance(picture, str):
            pics = [{"caption": f"picture not readable: {picture}", "uri": None, "kind": "missing"}]
        else:
            pics = [{"caption": "photo", "uri": plots.thumbnail(picture), "kind": "thumb"}]
            if heat_of is not None and drawn < heatmaps and row["model_version"] == version:
                heat = heat_of(picture)
                raised = "red raised the melanoma risk" if heat.max() > 0 else "no region raised the melanoma risk"
                pics.append({"caption": f"Grad-CAM: {raised}", "uri": plots.heat_overlay(picture, heat), "kind": "heatmap"})
                drawn += 1
        # p_<snake_case class> columns back to class names (every class name is lower case words)
        probs = sorted(((k[2:].replace("_", " "), v) for k, v in row.items() if k.startswith("p_") and v is not None),
                       key=lambda c: -c[1])
        cards.append({"rank": rank, "row": row, "pics": pics, "probs": probs})
    return cards, drawn


def _pictures(rows: list[dict]) -> list[np.ndarray | str]:
    """Each row's decoded picture, or why there is none (read as scoring reads its inputs)."""
    s = settings()
    pictures = [_decode(data, s) for data in archive.fetch_uris([row["image_uri"] for row in rows], s.fetch_threads)]
    for row, picture in zip(rows, pictures):
        if isinstance(picture, str):
            log.warning("%s: no picture for the report: %s", row["image_uri"], picture)
    return pictures


def _decode(data: bytes | storage.StorageError, s: Settings) -> np.ndarray | str:
    if isinstance(data, storage.StorageError):
        return str(data)
    try:
        return images.decode(data, s.max_image_pixels, s.max_decoded_side)
    except images.ImageError as exc:
        return str(exc)


def _drift_panel(figures: dict | None) -> str | None:
    if not figures or "features" not in figures:
        return None
    return plots.drift_panel(figures, {name: label for name, (label, _) in drift.FEATURES.items()})


def _drift_rows(figures: dict | None) -> list[list]:
    """Each compared figure: this night, validation, PSI, p-value, moved."""
    if not figures or "features" not in figures:
        return []
    rows = [
        [drift.FEATURES[name][0] + " (mean)", f["mean"], f["reference_mean"], f["psi"], f"{f['p_value']:.2g}", f["shifted"]]
        for name, f in figures["features"].items()
    ]
    flagged, mix = figures["flagged_share"], figures["class_mix"]
    rows.append(["share flagged", flagged["night"], flagged["reference"], flagged["psi"], f"{flagged['p_value']:.2g}", flagged["shifted"]])
    top = max(mix["night"], key=mix["night"].get)
    rows.append([f"predicted class mix ({top})", mix["night"][top], mix["reference"][top], mix["psi"], f"{mix['p_value']:.2g}",
                 mix["shifted"]])  # fmt: skip
    return [row[:-1] + ["moved" if row[-1] else "no"] for row in rows]


def _flagged_caption(flagged: int, shown: int, drawn: int, threshold: float | None, scores_uri: str, run_date: str) -> str:
    text = f"{flagged} flagged"
    if threshold is not None:
        text += f" (melanoma risk at or above {_fmt(threshold)})"
    if shown < flagged:
        text += f"; the {shown} highest are shown (all of them: melanoma query {scores_uri} --date {run_date} --flagged)"
    if drawn:
        text += f"; the first {drawn} with a Grad-CAM heatmap of where the model looked"
    return text + "."


def _summary(scores_uri: str, run_date: str) -> dict:
    """The run summary, written once the night is complete; {} without one (the rows are still reported)."""
    if not storage.exists(layout.summary_uri(scores_uri, run_date)):
        log.warning("%s: no run summary (the run did not finish?)", layout.summary_uri(scores_uri, run_date))
        return {}
    try:
        return layout.read_summary(scores_uri, run_date)
    except storage.StorageError as exc:
        log.warning("%s", exc)
        return {}


def _fmt(value) -> str:
    """How a value reads in a page: — for none, three decimals for a float."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_TEMPLATES.filters["fmt"] = _fmt


def _render(template: str, out_path: str, **context) -> None:
    page = _TEMPLATES.get_template(template).render(
        melanoma=MELANOMA, generated=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}", **context
    )
    storage.write_bytes(out_path, page.encode())
