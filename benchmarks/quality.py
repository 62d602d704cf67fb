"""Model-quality comparison: trains each recipe through train.train (Ray Train, the same path as
`melanoma train`), then measures every published model on the 9-class validation split (held-out
cross-fitted alert figures from metrics.calibrate), on HAM-test (half of the HAM10000 lesion-split
validation lesions, never used by any recipe) with the model's SHIPPED temperature and threshold, and on
the 9-class validation images re-sized to other shapes before the scoring path (decode -> resize to WxH
-> images.resize to the input size -> model).

    # once: the leak-free split, Augmentor rebalancing, the HAM10000 work dir (see docs/quality.md)
    python benchmarks/quality.py prepare --root /work/q
    # one recipe at a time (results/<recipe>.json under --root); --epochs overrides the recipe's epochs
    python benchmarks/quality.py run --root /work/q --recipes v2-plain --epochs 12
    # ensembles of recipes already run (`melanoma ensemble`), measured the same way
    python benchmarks/quality.py ensemble --root /work/q --ensembles ens-nv2000-2seeds
    # the markdown table of everything run so far
    python benchmarks/quality.py table --root /work/q

Recipes and ensembles are listed by `python benchmarks/quality.py list`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path("/work/shared/data")
DATA = {
    "aug": "work", "plain": "work-plain", "ham": "work-ham", "ham-mixed": "work-ham-mixed",
    "ham-mixed-nv2000": "work-ham-mixed-nv2000", "ham-mixed-all": "work-ham-mixed-all",
}

# name -> Settings overrides + which work dir. "aug" = Augmentor-rebalanced 9-class training split,
# "plain" = the 9-class training split only (class-weighted loss, weights capped at 10),
# "ham" = plain + HAM10000 lesion-split training rows (nevus capped at 600 images), validated on the 9-class split;
# "ham-mixed" = the same training rows, validated (early stopping, temperature, alert threshold) on the 9-class
# split plus half of the HAM validation lesions; the other half is HAM-test, the held-out set of every recipe;
# "ham-mixed-nv2000" = the same, with up to 2,000 HAM nevi in training instead of 600 (validation is never
# subsampled, so its validation split and HAM-test are the same images); "ham-mixed-all" = every HAM nevus.
RECIPES: dict[str, dict] = {
    "seed-cnn": {"arch": "seed-cnn", "image_size": 180, "data": "aug", "epochs": 3, "lr_schedule": "constant"},
    "residual-sep": {"arch": "residual-sep", "image_size": 180, "data": "aug", "epochs": 8, "lr_schedule": "constant"},
    "v2-aug": {"arch": "residual-sep-v2", "image_size": 128, "data": "aug", "epochs": 12, "lr_schedule": "cosine"},
    "v2-plain": {
        "arch": "residual-sep-v2", "image_size": 128, "data": "plain", "epochs": 12, "lr_schedule": "cosine",
        "class_weight_cap": 10.0,
    },
    "v2-ham": {
        "arch": "residual-sep-v2", "image_size": 128, "data": "ham", "epochs": 12, "lr_schedule": "cosine",
        "class_weight_cap": 10.0,
    },
    "v2-ham-mixed": {
        "arch": "residual-sep-v2", "image_size": 128, "data": "ham-mixed", "epochs": 12, "lr_schedule": "cosine",
        "class_weight_cap": 10.0,
    },
    "v2-ham-mixed-nv2000": {
        "arch": "residual-sep-v2", "image_size": 128, "data": "ham-mixed-nv2000", "epochs": 20,
        "lr_schedule": "cosine", "class_weight_cap": 10.0,
    },
    "v2-ham-mixed-nv2000-s1": {  # the same recipe with another training seed: a second ensemble member
        "arch": "residual-sep-v2", "image_size": 128, "data": "ham-mixed-nv2000", "epochs": 20,
        "lr_schedule": "cosine", "class_weight_cap": 10.0, "seed": 1,
    },
    "v2-ham-mixed-nv2000-180": {  # the same at 180x180 input: twice the compute per image, so half the epochs
        "arch": "residual-sep-v2", "image_size": 180, "data": "ham-mixed-nv2000", "epochs": 10,
        "lr_schedule": "cosine", "class_weight_cap": 10.0,
    },
    "v2-ham-mixed-all": {
        "arch": "residual-sep-v2", "image_size": 128, "data": "ham-mixed-all", "epochs": 12,
        "lr_schedule": "cosine", "class_weight_cap": 10.0,
    },
}
# name -> member recipes, averaged by `melanoma ensemble` and calibrated on the validation split every member
# validated on (9-class val + the validating half of the HAM lesions). Chosen before measuring: the seeds of the
# recommended recipe, and every recipe validated on both sources.
ENSEMBLES: dict[str, list[str]] = {
    "ens-nv2000-2seeds": ["v2-ham-mixed-nv2000", "v2-ham-mixed-nv2000-s1"],
    "ens-mixed-4": ["v2-ham-mixed", "v2-ham-mixed-nv2000", "v2-ham-mixed-nv2000-s1", "v2-ham-mixed-all"],
}
SHAPES = ((224, 224), (600, 450))


def prepare(root: Path) -> None:
    from melanoma import augment, dataset, ham10000, storage

    work = root / "work"
    if not (work / dataset.MANIFEST).exists():
        dataset.make_split(str(SHARED / "isic-9class/Train"), str(work), 0.2, 42,
                           ground_truth_uri=str(SHARED / "labels/isic2019_training_ground_truth.csv"))
    if augment.read_augmented(str(work)) is None:
        augment.augment_work_dir(str(work), 42)
    plain = root / "work-plain"
    plain.mkdir(parents=True, exist_ok=True)
    for name in (dataset.MANIFEST, "audit.json"):
        storage.write_bytes(str(plain / name), (work / name).read_bytes())
    ham = {  # data dir -> (nevus cap or None, fraction of HAM validation lesions moved into the validation split)
        "ham": (600, 0.0), "ham-mixed": (600, 0.5), "ham-mixed-nv2000": (2000, 0.5), "ham-mixed-all": (None, 0.5),
    }
    for name, (nevi, to_manifest) in ham.items():
        if (root / DATA[name] / dataset.MANIFEST).exists():
            continue
        report = ham10000.build_work(str(work), str(SHARED / "ham10000"), str(root / DATA[name]), 0.2, 42,
                                     max_train_per_class=None if nevi is None else {"nevus": nevi}, val_to_manifest=to_manifest)
        print(name, json.dumps(report["per_split"], indent=1))


def _probs(model, pixels: list[np.ndarray], size: int) -> np.ndarray:
    from melanoma import images

    out = []
    for start in range(0, len(pixels), 64):
        batch = np.stack([images.resize(p, size) for p in pixels[start : start + 64]]).astype(np.float32)
        out.append(model.predict_on_batch(batch))
    return np.concatenate(out)


def shipped_figures(probs: np.ndarray, labels: np.ndarray, card: dict) -> dict:
    """Metrics of the model as shipped: its temperature and alert threshold, nothing refitted."""
    from melanoma import metrics
    from melanoma.config import CLASS_NAMES, MELANOMA

    mel = CLASS_NAMES.index(MELANOMA)
    calibrated = metrics.temperature_scale(probs, card["temperature"])
    report = metrics.classification_report(calibrated, labels, list(CLASS_NAMES), MELANOMA)
    positive = labels == mel
    # how far the AUC moves under resampling of these images: 1,000 bootstrap draws, 2.5th and 97.5th percentiles
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(labels), len(labels)) for _ in range(1000)]
    aucs = [a for a in (metrics.roc_auc(calibrated[d, mel], positive[d]) for d in draws) if a is not None]  # None: no melanoma drawn
    return {
        "n": int(len(labels)),
        "balanced_accuracy": report["balanced_accuracy"],
        "accuracy": report["accuracy"],
        "melanoma_auc": report["melanoma_auc"],
        "melanoma_auc_95": [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))],
        "recall": {name: [c["recall"], c["support"]] for name, c in report["per_class"].items() if c["support"]},
        "ece": metrics.expected_calibration_error(calibrated[:, mel], positive),
        **metrics.alert_report(calibrated[:, mel], positive, card["alert_threshold"]),
    }


def measure(version_dir: str, s, root: Path) -> dict:
    """9-class validation rows (whatever else the recipe validated on) and HAM-test, at the shipped settings."""
    from melanoma import dataset, ham10000, images, metrics, registry, storage, train
    from melanoma.config import CLASS_NAMES, MELANOMA

    loaded = registry.load(version_dir)
    model, card = loaded.model, loaded.card
    size = card["input_size"][0]
    _, val = train.training_tables(card["data_uri"])
    val = val[val["image_id"].isin(set(dataset.read_manifest(str(root / DATA["aug"]))["image_id"]))]
    decoded = [images.decode(storage.read_bytes(u), s.max_image_pixels, s.max_decoded_side) for u in val["uri"]]
    labels = val["label_index"].to_numpy()
    out = {"val_shipped": shipped_figures(_probs(model, decoded, size), labels, card), "shapes": {}}
    for w, h in SHAPES:
        resized = [np.array(Image.fromarray(p).resize((w, h), Image.Resampling.BILINEAR)) for p in decoded]
        out["shapes"][f"{w}x{h}"] = shipped_figures(_probs(model, resized, size), labels, card)
    # scoring resizes to Settings.image_size, not to the card's input size: what a mismatch costs
    for other in sorted({128, 180} - {size}):
        out["shapes"][f"pipeline resizes to {other}"] = shipped_figures(_probs(model, decoded, other), labels, card)
    ham_test = ham10000.read_val(str(root / DATA["ham-mixed"]))  # never seen by any recipe
    pixels = [images.decode(storage.read_bytes(u), s.max_image_pixels, s.max_decoded_side) for u in ham_test["uri"]]
    ham_probs = _probs(model, pixels, size)
    ham_labels = ham_test["label_index"].to_numpy()
    out["ham_test_shipped"] = shipped_figures(ham_probs, ham_labels, card)
    # HAM-test's own cross-fitted figures (temperature and threshold refitted on halves of it)
    cal = metrics.calibrate(ham_probs, ham_labels, CLASS_NAMES.index(MELANOMA), s.target_sensitivity, s.seed)
    out["ham_test_refit_held_out"] = cal["held_out"]
    return out


def run(root: Path, names: list[str], epochs: int | None, workers: int) -> None:
    import ray

    from melanoma import train
    from melanoma.config import settings

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    (root / "results").mkdir(parents=True, exist_ok=True)
    for name in names:
        recipe = dict(RECIPES[name])
        data = str(root / DATA[recipe.pop("data")])
        if epochs is not None:
            recipe["epochs"] = epochs
        s = settings(workers=workers, **recipe)
        run_name = f"{name}-e{s.epochs}-w{workers}-{int(time.time())}"
        started = time.time()
        card = train.train(s, data, str(root / "models"), run_name=run_name)
        wall = time.time() - started
        result = {
            "recipe": name, "settings": recipe | {"workers": workers}, "epochs_run": card["epochs_run"],
            "train_images": card["train_images"], "wall_seconds_incl_data_and_eval": round(wall, 1),
            "epoch_seconds": [round(h["epoch_seconds"], 1) for h in card["history"]], "history": card["history"],
        }
        _save(root, result | _card_result(card) | measure(os.path.join(str(root / "models"), card["version"]), s, root))
    ray.shutdown()


def combine(root: Path, names: list[str]) -> None:
    """Average the published models of each ensemble's member recipes (results/<recipe>.json) into one model."""
    from melanoma import ensemble
    from melanoma.config import settings

    s = settings()
    for name in names:
        members = [json.loads((root / "results" / f"{r}.json").read_text()) for r in ENSEMBLES[name]]
        uris = [os.path.join(str(root / "models"), m["version"]) for m in members]
        card = ensemble.combine(s, uris, str(root / DATA["ham-mixed-nv2000"]), str(root / "models"))
        result = {
            "recipe": name, "members": ENSEMBLES[name],
            "epochs_run": "/".join(str(m["epochs_run"]) for m in members),
            "train_images": "/".join(str(m["train_images"]) for m in members),
        }
        _save(root, result | _card_result(card) | measure(os.path.join(str(root / "models"), card["version"]), s, root))


def _card_result(card: dict) -> dict:
    return {
        "data_uri": card["data_uri"], "version": card["version"], "val_images": card["val_images"],
        "training_seconds": card["training_seconds"],
        "val": {
            "balanced_accuracy": card["metrics"]["balanced_accuracy"], "melanoma_auc": card["metrics"]["melanoma_auc"],
            "held_out": card["calibration"]["held_out"], "temperature": card["temperature"],
            "alert_threshold": card["alert_threshold"], "in_sample_at_threshold": card["calibration"]["at_threshold"],
        },
    }


def _save(root: Path, result: dict) -> None:
    (root / "results" / f"{result['recipe']}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("recipe", "training_seconds", "val", "ham_test_shipped")}, indent=1))


def remeasure(root: Path) -> None:
    """Recompute the measurements (not the training) of every result file, e.g. after adding a shape."""
    from melanoma.config import settings

    for p in sorted((root / "results").glob("*.json")):
        result = json.loads(p.read_text())
        result = {k: v for k, v in result.items() if not k.startswith("ham_val")}  # measured on the whole HAM val
        result |= measure(os.path.join(str(root / "models"), result["version"]), settings(), root)
        p.write_text(json.dumps(result, indent=2))


def table(root: Path) -> str:
    rows = sorted((json.loads(p.read_text()) for p in (root / "results").glob("*.json")), key=lambda r: ("members" in r, r["recipe"]))
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "| recipe | epochs | train imgs | train wall s | 9-class val BA | 9-class val mel AUC | own val, held-out: sens / spec / ECE "
        "| HAM-test BA (BA4) | HAM-test mel AUC (95% bootstrap) | HAM-test sens / spec @ shipped | HAM-test ECE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # BA4: mean recall over HAM-test's classes with 12 or more images; the other three have 1, 2 and 1 images,
    # so one image moves the 7-class balanced accuracy by 1/7
    ba4 = lambda ham: np.mean([recall for recall, n in ham["recall"].values() if n >= 12])  # noqa: E731
    for r in rows:
        v, h, ham = r["val_shipped"], r["val"]["held_out"], r["ham_test_shipped"]
        low, high = ham["melanoma_auc_95"]
        lines.append(
            f"| {r['recipe']} | {r['epochs_run']} | {r['train_images']} | {r['training_seconds']:.0f} | "
            f"{f(v['balanced_accuracy'])} | {f(v['melanoma_auc'])} | {f(h['sensitivity'])} / {f(h['specificity'])} / "
            f"{f(h['ece'])} | {f(ham['balanced_accuracy'])} ({ba4(ham):.3f}) | {f(ham['melanoma_auc'])} ({low:.3f}-{high:.3f}) | "
            f"{f(ham['sensitivity'])} / {f(ham['specificity'])} | {f(ham['ece'])} |"
        )
    support = {c: n for c, (_, n) in rows[0]["ham_test_shipped"]["recall"].items()} if rows else {}
    lines += ["", "| recipe | " + " | ".join(f"HAM-test recall: {c} (n={n})" for c, n in support.items()) + " |",
              "|---|" + "---|" * len(support)]
    classes = list(support)
    for r in rows:
        lines.append(f"| {r['recipe']} | " + " | ".join(f(r["ham_test_shipped"]["recall"][c][0]) for c in classes) + " |")
    lines += ["", "| recipe | shape | BA | mel AUC | sens @ shipped | spec @ shipped | ECE |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for shape, m in [("as stored", r["val_shipped"])] + list(r["shapes"].items()):
            lines.append(f"| {r['recipe']} | {shape} | {f(m['balanced_accuracy'])} | {f(m['melanoma_auc'])} | "
                         f"{f(m['sensitivity'])} | {f(m['specificity'])} | {f(m['ece'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--root", type=Path, required=True)
    p = sub.add_parser("run")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--recipes", required=True, help=f"comma-separated: {', '.join(RECIPES)}")
    p.add_argument("--epochs", type=int, help="override every recipe's epoch count")
    p.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("ensemble", help="average published recipes into one model (after their `run`)")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--ensembles", required=True, help=f"comma-separated: {', '.join(ENSEMBLES)}")
    p = sub.add_parser("remeasure")
    p.add_argument("--root", type=Path, required=True)
    p = sub.add_parser("table")
    p.add_argument("--root", type=Path, required=True)
    sub.add_parser("list")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "prepare":
        prepare(args.root)
    elif args.command == "run":
        run(args.root, args.recipes.split(","), args.epochs, args.workers)
    elif args.command == "ensemble":
        combine(args.root, args.ensembles.split(","))
    elif args.command == "remeasure":
        remeasure(args.root)
    elif args.command == "table":
        print(table(args.root))
    else:
        print(json.dumps({"recipes": RECIPES, "ensembles": ENSEMBLES}, indent=1))


if __name__ == "__main__":
    main()
