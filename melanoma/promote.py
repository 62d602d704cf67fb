"""The promotion gate: a candidate version replaces `latest` only if, on the same labelled images, it is not worse
than `latest` by the rule below (docs/promotion.md); every decision goes into an append-only log in the registry.

The rule, with the margins of Settings (promote_*), on each model as shipped (its temperature and its own alert
threshold):
  - AUC: the 2.5th percentile of a paired bootstrap of AUC(candidate) - AUC(latest), resampling the same images for
    both, is at least -promote_auc_margin (non-inferiority: the candidate must be shown not to be worse);
  - sensitivity at its own threshold is at least min(latest's, target_sensitivity) - promote_sensitivity_margin
    (a latest that flags nearly everything does not block a candidate that meets the target);
  - ECE is at most latest's + promote_ece_margin.

Log: one JSON object per decision under <model-dir>/_promotions/, never rewritten (an S3 object cannot be appended
to, and one object per entry cannot lose a concurrent entry). Promoting a version published before `latest` is a
rollback; --force moves `latest` whatever the rule says, and the entry says so.

Shadow scoring: a candidate scores the same night as `latest` into <scores>_shadow/<version>/ (layout.py), which
readers of <scores> never see.
"""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from melanoma import layout, metrics, registry, storage
from melanoma.config import CLASS_NAMES, IMAGE_SUFFIXES, MELANOMA, Settings
from melanoma.errors import MelanomaError

LOG_DIR = "_promotions"
FIGURES = ("melanoma_auc", "sensitivity", "specificity", "ece", "balanced_accuracy_supported")


class PromotionError(MelanomaError):
    """Why a promotion cannot be judged at all, in one line."""


class Refused(MelanomaError):
    """The candidate did not meet the rule: `latest` is unchanged (the decision is logged)."""


def labelled_images(csv_uri: str, images_uri: str) -> pd.DataFrame:
    """The rows of an image_id,label CSV (label: one of the 9 classes) with the uri of <image_id>.jpg|.png under
    images_uri and the label's index; one line per problem."""
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(csv_uri)), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise PromotionError(f"{csv_uri}: not a readable CSV ({exc.__class__.__name__})") from None
    missing = [c for c in ("image_id", "label") if c not in table.columns]
    if missing:
        raise PromotionError(f"{csv_uri}: missing column {', '.join(missing)} (labels need image_id,label)")
    fs, _ = storage.pyarrow_fs(images_uri)
    files = {f.base_name.rsplit(".", 1)[0]: storage.to_uri(fs, f.path) for f in storage.list_files(images_uri, IMAGE_SUFFIXES)}
    for line, (image_id, label) in enumerate(zip(table["image_id"], table["label"]), start=2):
        if label not in CLASS_NAMES:
            raise PromotionError(f"{csv_uri} line {line}: label '{label}' is not one of the 9 classes ({', '.join(CLASS_NAMES)})")
        if image_id not in files:
            raise PromotionError(f"{csv_uri} line {line}: no image file {image_id}.jpg under {images_uri}")
    positive = table["label"] == MELANOMA
    if not positive.any() or positive.all():
        raise PromotionError(f"{csv_uri}: a comparison needs melanomas and other lesions; it has {int(positive.sum())} melanomas in {len(table)} rows")
    return pd.DataFrame({
        "image_id": table["image_id"],
        "uri": [files[i] for i in table["image_id"]],
        "label_index": [CLASS_NAMES.index(label) for label in table["label"]],
    })


def measure(version_dir: str, rows: pd.DataFrame, s: Settings) -> tuple[dict, np.ndarray]:
    """(the shipped report, the calibrated melanoma risk per row) of one published model on the labelled rows,
    predicted the way training evaluates (train._predict)."""
    from melanoma import train

    loaded = registry.load(version_dir)
    card = loaded.card
    size = card.get("input_size", [s.image_size])[0]
    probs = train._predict(loaded.model, rows, dataclasses.replace(s, image_size=size))
    positive_index = card["class_names"].index(card.get("positive_class", MELANOMA))
    report = metrics.shipped_report(probs, rows["label_index"].to_numpy(), card["temperature"], card["alert_threshold"],
                                    positive_index, card["class_names"], draws=s.promote_bootstrap_draws)
    return report, metrics.temperature_scale(probs, card["temperature"])[:, positive_index]


def paired_auc_difference(candidate: np.ndarray, latest: np.ndarray, positive: np.ndarray, draws: int, seed: int = 0) -> dict:
    """AUC(candidate) - AUC(latest) on the same images, with its 95% interval from resampling the images once per
    draw for both models (paired: the spread of the difference, not of each AUC)."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(draws):
        d = rng.integers(0, len(positive), len(positive))
        a, b = metrics.roc_auc(candidate[d], positive[d]), metrics.roc_auc(latest[d], positive[d])
        if a is not None and b is not None:  # a draw without a melanoma has no AUC
            differences.append(a - b)
    return {
        "difference": metrics.roc_auc(candidate, positive) - metrics.roc_auc(latest, positive),
        "difference_95": [float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))],
    }


def judge(candidate: dict, latest: dict, auc: dict, s: Settings) -> dict:
    """The rule (module docstring) on two shipped reports and the paired AUC difference: each test with its
    numbers, and `passed` when all hold."""
    sensitivity_floor = min(latest["sensitivity"], s.target_sensitivity) - s.promote_sensitivity_margin
    tests = {
        "auc": {"lower_95": auc["difference_95"][0], "min": -s.promote_auc_margin},
        "sensitivity": {"value": candidate["sensitivity"], "min": sensitivity_floor},
        "ece": {"value": candidate["ece"], "max": latest["ece"] + s.promote_ece_margin},
    }
    tests["auc"]["passed"] = tests["auc"]["lower_95"] >= tests["auc"]["min"]
    tests["sensitivity"]["passed"] = candidate["sensitivity"] >= sensitivity_floor
    tests["ece"]["passed"] = candidate["ece"] <= tests["ece"]["max"]
    return {"tests": tests, "passed": all(t["passed"] for t in tests.values())}


def why_refused(rule: dict) -> str:
    """The failed tests of a rule, in words."""
    t = rule["tests"]
    said = {
        "auc": f"AUC difference lower 95% bound {t['auc']['lower_95']:+.3f} < {t['auc']['min']:+.3f}",
        "sensitivity": f"sensitivity {t['sensitivity']['value']:.3f} < {t['sensitivity']['min']:.3f}",
        "ece": f"ECE {t['ece']['value']:.3f} > {t['ece']['max']:.3f}",
    }
    return "; ".join(said[name] for name, test in t.items() if not test["passed"])


def current(model_dir: str) -> str | None:
    """The version `latest` names, or None before the first promotion."""
    pointer = storage.join(model_dir, registry.LATEST)
    return storage.read_bytes(pointer).decode().strip() if storage.exists(pointer) else None


def candidate_version(model_dir: str, candidate: str) -> str:
    """A version name, or the URI of a version dir inside model_dir -> the version name (it must be published there)."""
    version = candidate.rstrip("/").rsplit("/", 1)[-1]
    if candidate != version and storage.join(candidate).rstrip("/") != storage.join(model_dir, version):
        raise PromotionError(f"{candidate}: not a version of {model_dir} (publish it there, then promote its version)")
    if not storage.exists(storage.join(model_dir, version, registry.CARD_FILE)):
        raise PromotionError(f"{storage.join(model_dir, version)}: no such published version")
    return version


def published_before(model_dir: str, version: str, other: str) -> bool:
    """Whether `version` was published before `other` (card created_at, else the version names, which start with
    the UTC time of publication)."""
    a, b = registry.read_card(storage.join(model_dir, version)), registry.read_card(storage.join(model_dir, other))
    if a.get("created_at") and b.get("created_at"):
        return datetime.fromisoformat(a["created_at"]) < datetime.fromisoformat(b["created_at"])
    return version < other


def promote(s: Settings, candidate: str, model_dir: str, labels_uri: str, images_uri: str, force: bool = False) -> dict:
    """Judges the candidate against `latest` on the labelled images, moves `latest` if it passes (or if forced),
    logs the decision and returns the log entry. The first promotion (no `latest` yet) is not compared."""
    version = candidate_version(model_dir, candidate)
    previous = current(model_dir)
    if previous == version:
        raise PromotionError(f"{storage.join(model_dir, version)}: already latest")
    entry = {"candidate": version, "previous": previous, "forced": force, "labels": labels_uri, "images": images_uri}
    if previous is None:
        entry |= {"decision": "first"}
    else:
        rows = labelled_images(labels_uri, images_uri)
        report_c, risk_c = measure(storage.join(model_dir, version), rows, s)
        report_l, risk_l = measure(storage.join(model_dir, previous), rows, s)
        auc = paired_auc_difference(risk_c, risk_l, rows["label_index"].to_numpy() == CLASS_NAMES.index(MELANOMA),
                                    s.promote_bootstrap_draws)
        rule = judge(report_c, report_l, auc, s) | {"auc_difference": auc}
        moved = rule["passed"] or force
        rollback = published_before(model_dir, version, previous)
        decision = "refused" if not moved else "rollback" if rollback else "promoted" if rule["passed"] else "forced"
        entry |= {"decision": decision, "rule": rule, "figures": {"candidate": report_c, "previous": report_l},
                  "images_compared": len(rows)}
        if not moved:
            entry["reason"] = why_refused(rule)
    entry = {"time": datetime.now(timezone.utc).isoformat()} | entry  # when decided: the log's order
    write_entry(model_dir, entry)  # before `latest` moves: no move goes unlogged
    if entry["decision"] != "refused":
        registry.set_latest(model_dir, version)
    return entry


def write_entry(model_dir: str, entry: dict) -> str:
    """One new object per entry, named by its time and candidate: the log is only ever added to."""
    stamp = datetime.fromisoformat(entry["time"]).strftime("%Y%m%dT%H%M%S%fZ")
    uri = storage.join(model_dir, LOG_DIR, f"{stamp}-{entry['candidate']}.json")
    if storage.exists(uri):
        raise PromotionError(f"{uri}: a log entry of that name exists already")
    storage.write_bytes(uri, json.dumps(entry, indent=2).encode())
    return uri


def history(model_dir: str) -> list[dict]:
    """Every logged decision, oldest first."""
    if not storage.exists(storage.join(model_dir, LOG_DIR)):
        return []
    return [json.loads(storage.read_bytes(storage.join(model_dir, LOG_DIR, f.base_name)))
            for f in storage.list_files(storage.join(model_dir, LOG_DIR), (".json",))]


def comparison_lines(entry: dict) -> str:
    """The two models side by side and the paired AUC difference (nothing for the first promotion)."""
    if entry["decision"] == "first":
        return ""
    c, p = entry["figures"]["candidate"], entry["figures"]["previous"]
    cell = lambda r, k: "n/a" if r[k] is None else f"{r[k]:.3f}"  # noqa: E731
    auc = lambda r: f"{cell(r, 'melanoma_auc')} ({r['melanoma_auc_95'][0]:.3f}-{r['melanoma_auc_95'][1]:.3f})"  # noqa: E731
    rows = [("", f"candidate {entry['candidate']}", f"latest {entry['previous']}"),
            ("melanoma AUC (95%)", auc(c), auc(p)),
            *[(label, cell(c, key), cell(p, key)) for label, key in (
                ("alert threshold", "threshold"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                ("ECE", "ece"), ("balanced accuracy", "balanced_accuracy_supported"))]]
    width = max(len(r[1]) for r in rows) + 2
    d = entry["rule"]["auc_difference"]
    return "\n".join([f"{a:<20}{b:<{width}}{c_}" for a, b, c_ in rows] + [
        f"AUC difference {d['difference']:+.3f} (paired 95%: {d['difference_95'][0]:+.3f} to {d['difference_95'][1]:+.3f})"
        f" on {entry['images_compared']} images, {c['melanomas']} melanomas"])


def decision_line(entry: dict) -> str:
    """One line: what happened to `latest`, and why when the rule was not met."""
    version, previous = entry["candidate"], entry["previous"]
    if entry["decision"] == "first":
        return f"promoted {version}: the first version to be latest (nothing to compare with)"
    if entry["decision"] == "refused":
        return f"refused {version}: {entry['reason']}; latest stays {previous}"
    how = {"promoted": "promoted", "rollback": "rolled back to", "forced": "forced"}[entry["decision"]]
    over = f" (forced over: {why_refused(entry['rule'])})" if not entry["rule"]["passed"] else ""
    return f"{how} {version} (latest was {previous}){over}"


def shadow_settings(s: Settings, candidate: str, scores_uri: str) -> Settings:
    """The settings that turn a scoring run into the candidate's shadow run: its model, the shadow root and
    bookkeeping apart from the main run's."""
    version = registry.read_card(candidate)["version"]
    return dataclasses.replace(s, model_uri=candidate, scores_uri=layout.shadow_root(scores_uri, version),
                               work_uri=layout.shadow_work(scores_uri, version, s.work_uri))
