"""Model quality on test sets no model trains or calibrates on, one per source, at each model's shipped
temperature and alert threshold.

The work dir is the one `melanoma pipeline` builds (melanoma/pipeline.py): the 9-class split, Augmentor
samples, HAM10000 and isic-extra added as sources, each split by lesion or patient into train / val / test.
The test sets are the manifest's `test` rows, per sub-source: HAM-test (the same 830 images, 112 melanomas,
as in earlier measurements), isic2020 (held-out patients), isic2019-84px (BCN_20000 thumbnails, held-out
lesions) and isic2017.

    # the work dir (split, augment, sources; skips what is there)
    python benchmarks/quality.py prepare --root /work/q2 --data ../shared/data
    # train recipes through train.train (Ray Train, the path of `melanoma train`), then measure them
    python benchmarks/quality.py run --root /work/q2 --recipes lite0
    # measure a model published elsewhere (e.g. by `melanoma pipeline`) under a name, through an engine
    python benchmarks/quality.py measure --root /work/q2 --model /work/q2/models --name lite0 [--engine tflite-int8]
    # the markdown tables of every result
    python benchmarks/quality.py table --root /work/q2

Results land in <root>/results/<name>.json; the last line printed by run/measure is one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

# name -> Settings overrides (the rest are the defaults, i.e. the pipeline's recipe)
RECIPES: dict[str, dict] = {
    "lite0": {},
    "lite0-160": {"image_size": 160},
    "lite0-no-lowres": {"lowres_share": 0.0},
    "v2-scratch": {"arch": "residual-sep-v2", "learning_rate": 1e-3},
}


def prepare(root: Path, data: str) -> None:
    from melanoma import pipeline
    from melanoma.config import settings

    pipeline.prepare(settings(), data, str(root / "work"))


def test_sets(work: str) -> dict:
    """{sub-source: rows with label_index} of the manifest's test split."""
    from melanoma import dataset, train

    manifest = dataset.read_manifest(work)
    test = train.with_label_index(manifest[manifest["split"] == "test"])
    return {source: rows.reset_index(drop=True) for source, rows in test.groupby("source")}


def load_pixels(uris, size: int) -> np.ndarray:
    from melanoma import images, storage
    from melanoma.config import settings

    s = settings()
    return np.stack([images.resize(images.decode(storage.read_bytes(u), s.max_image_pixels, s.max_decoded_side), size)
                     for u in uris])  # fmt: skip


def predictor(loaded, engine_name: str, work: str, calibration_images: int = 256):
    """The published model through one engine: Keras, its TF-Lite float32 export, or an int8 export whose
    ranges are set on calibration_images validation images (what publishing would use)."""
    from melanoma import dataset, engine

    size = loaded.card["input_size"][0]
    if engine_name == "keras":
        return engine.KerasEngine(loaded.model)
    calibration = None
    if engine_name == "tflite-int8":
        val = dataset.read_manifest(work).query("split == 'val'")
        calibration = load_pixels(list(val.sample(calibration_images, random_state=0)["uri"]), size)
    return engine.TFLiteEngine(engine.export_tflite(loaded.model, size, calibration), threads=2)


def predict(model, uris, size: int, batch: int = 64) -> np.ndarray:
    return np.concatenate([model.predict(load_pixels(uris[i : i + batch], size).astype(np.float32))
                           for i in range(0, len(uris), batch)])  # fmt: skip


def measure(model_uri: str, work: str, engine_name: str = "keras", calibration_images: int = 256) -> dict:
    from melanoma import metrics, registry
    from melanoma.config import CLASS_NAMES, MELANOMA

    loaded = registry.load(model_uri)
    card = loaded.card
    model = predictor(loaded, engine_name, work, calibration_images)
    out = {"version": card["version"], "engine": engine_name, "calibration_images": calibration_images, "recipe": card.get("recipe"),
           "training_seconds": card.get("training_seconds"), "epochs_run": card.get("epochs_run"),
           "train_images": card.get("train_images"), "val_held_out": card["calibration"]["held_out"], "test": {}}
    for source, rows in test_sets(work).items():
        probs = predict(model, list(rows["uri"]), card["input_size"][0])
        out["test"][source] = metrics.shipped_report(
            probs, rows["label_index"].to_numpy(), card["temperature"], card["alert_threshold"],
            CLASS_NAMES.index(MELANOMA), list(CLASS_NAMES),
        )
    return out


def _save(root: Path, name: str, result: dict) -> None:
    (root / "results").mkdir(parents=True, exist_ok=True)
    (root / "results" / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({"recipe": name} | {f"{src}_{k}": v[k] for src, v in result["test"].items()
                                         for k in ("melanoma_auc", "sensitivity", "specificity", "ece", "balanced_accuracy_supported")}))


def run(root: Path, names: list[str], workers: int) -> None:
    import ray

    from melanoma import train
    from melanoma.config import settings

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    work = str(root / "work")
    for name in names:
        s = settings(workers=workers, **RECIPES[name])
        started = time.time()
        card = train.train(s, work, str(root / "models"), run_name=f"{name}-{train.run_name_for(s, work)}")
        result = measure(str(root / "models" / card["version"]), work) | {"wall_seconds": round(time.time() - started, 1)}
        _save(root, name, result)
    ray.shutdown()


def table(root: Path) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [(p.stem, json.loads(p.read_text())) for p in sorted((root / "results").glob("*.json"))]
    sources = sorted({s for _, r in rows for s in r["test"]})
    lines = []
    for source in sources:
        first = next(r["test"][source] for _, r in rows if source in r["test"])
        lines += [f"**{source}** test: {first['n']} images, {first['melanomas']} melanomas; BA over "
                  f"{', '.join(first['supported_classes']) or 'no class'} (12+ images)", "",
                  "| model | epochs | train wall s | mel AUC (95% bootstrap) | sens / spec @ shipped | flagged | ECE | BA (12+) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in rows:
            t = r["test"].get(source)
            if t is None:
                continue
            low, high = t["melanoma_auc_95"] or (None, None)
            lines.append(f"| {name} | {r['epochs_run']} | {r['training_seconds']:.0f} | {f(t['melanoma_auc'])} ({f(low)}-{f(high)}) | "
                         f"{f(t['sensitivity'])} / {f(t['specificity'])} | {f(t['flagged_fraction'])} | {f(t['ece'])} | "
                         f"{f(t['balanced_accuracy_supported'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--data", default="../shared/data", help="the data root (isic-9class/, labels/, ham10000/, isic-extra/)")
    p = sub.add_parser("run")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--recipes", required=True, help=f"comma-separated: {', '.join(RECIPES)}")
    p.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("measure")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--model", required=True, help="a model dir (its latest) or a version dir")
    p.add_argument("--name", required=True)
    p.add_argument("--engine", default="keras", choices=("keras", "tflite", "tflite-int8"))
    p.add_argument("--calibration-images", type=int, default=256, help="validation images that set the int8 ranges")
    p = sub.add_parser("table")
    p.add_argument("--root", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.command == "prepare":
        prepare(args.root, args.data)
    elif args.command == "run":
        run(args.root, args.recipes.split(","), args.workers)
    elif args.command == "measure":
        _save(args.root, args.name, measure(args.model, str(args.root / "work"), args.engine, args.calibration_images))
    else:
        print(table(args.root))


if __name__ == "__main__":
    main()
