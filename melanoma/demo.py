"""`melanoma demo`: the whole flow on one machine with embedded defaults.

  a local SeaweedFS S3 server (data in .demo/seaweedfs) and a local Ray
  1 audit and split the training set      -> s3://melanoma/work (manifest, audit.json)
  2 augment the training split            -> s3://melanoma/work/augmented
  3 train briefly on Ray Train            -> .demo/models (checkpoints in s3://melanoma/runs)
  4 tonight's archive: sample images      -> .demo/archive/<date>
  5 nightly scoring on Ray Data           -> .demo/scores/run_date=<date>

What a person reads afterwards (models, archive, scores) stays on local disk, so that `melanoma query` and
`melanoma report` work on it once the demo's services have stopped. A rerun skips every step whose output
exists and says so.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from datetime import datetime, timezone
from pathlib import Path

from melanoma import augment, console, dataset, layout, query, registry, runtime, score, storage, train
from melanoma.config import settings
from melanoma.local import SeaweedServer

log = logging.getLogger(__name__)

BUCKET = "melanoma"
WORK, RUNS = f"s3://{BUCKET}/work", f"s3://{BUCKET}/runs"
STEPS = 5
DOWNLOAD_HELP = (
    "Download the 9-class ISIC dataset ('Skin Cancer ISIC - The International Skin Imaging Collaboration', "
    "its Train/ folder with one sub-folder per class) and put it at {path}/<class name>/*.jpg, "
    "or pass --data PATH_OR_S3_URI."
)


def _shared_data() -> Path:
    """../shared/data next to the working directory or next to the checkout, whichever exists."""
    here = Path(__file__).resolve().parent.parent
    for root in (Path.cwd().parent / "shared" / "data", here.parent / "shared" / "data"):
        if root.is_dir():
            return root
    return Path.cwd().parent / "shared" / "data"


def find_training_data(data: str | None) -> tuple[str, str | None]:
    """(dataset root, ground-truth CSV or None): the given one, else the shared copy with its ISIC 2019 labels."""
    if data:
        return data, None
    path = _shared_data() / "isic-9class" / "Train"
    if not path.is_dir():
        raise dataset.DatasetError(f"no training data at {path}. " + DOWNLOAD_HELP.format(path=path))
    labels = _shared_data() / "labels" / "isic2019_training_ground_truth.csv"
    return str(path), str(labels) if labels.is_file() else None


def _step(n: int, what: str, done: str | None = None) -> bool:
    """Logs the step; True when it still has to run (`done` names its existing output otherwise)."""
    if done:
        log.info("step %d/%d %s: skipped, %s", n, STEPS, what, done)
        return False
    log.info("step %d/%d %s", n, STEPS, what)
    return True


def _split(data_uri: str, ground_truth: str | None, seed: int, val_fraction: float) -> None:
    manifest = storage.join(WORK, dataset.MANIFEST)
    if _step(1, f"audit and split {data_uri}", storage.exists(manifest) and f"{manifest} exists"):
        dataset.make_split(data_uri, WORK, val_fraction, seed, ground_truth)
    report = json.loads(storage.read_bytes(storage.join(WORK, "audit.json")))
    log.info("  %d files, %d unique images, %d duplicate groups, %d with conflicting labels (%s)",
             report["files"], report["unique_images"], report["duplicate_groups"], report["conflicting_groups"],
             "resolved by the ISIC 2019 ground truth where it names one folder" if ground_truth else "dropped")  # fmt: skip


def _augment(seed: int) -> None:
    done = augment.read_augmented(WORK) is not None
    if _step(2, "augment the training split, every class to the largest", done and f"{WORK}/{augment.AUGMENTED_DIR} exists"):
        augment.augment_work_dir(WORK, seed)


def _train(s, models: Path) -> dict:
    latest = models / registry.LATEST
    if _step(3, f"train {s.arch} for {s.epochs} epochs on Ray Train ({s.workers} workers)", latest.exists() and f"{latest} exists"):
        train.train(s, WORK, str(models), storage_uri=RUNS)
    card = registry.read_card(str(models))
    log.info("  model %s: melanoma AUC %.3f on validation", card["version"], card["metrics"]["melanoma_auc"] or float("nan"))
    return card


def _archive(source: Path, target: Path, n: int, seed: int) -> None:
    if _step(4, f"tonight's archive: {n} images of {source}", target.is_dir() and f"{target} exists"):
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise dataset.DatasetError(f"{source}: no images (.jpg, .jpeg, .png) for tonight's archive")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for path in random.Random(seed).sample(files, min(n, len(files))):
            shutil.copyfile(path, partial / path.name)
        partial.rename(target)


def _score(s, models: Path, archive: Path, scores: Path, run_date: str) -> dict:
    summary = Path(layout.summary_uri(str(scores), run_date))
    if _step(5, f"nightly scoring of {archive}", summary.exists() and f"{summary} exists"):
        return score.score(s, str(models), str(archive), str(scores), run_date)
    return layout.read_summary(str(scores), run_date)


def run(data: str | None, archive_source: str | None, epochs: int, archive_images: int, workdir: str = ".demo",
        verbose: bool = False) -> dict:  # fmt: skip
    """Runs (or resumes) the demo; returns the night's summary with what the closing lines need."""
    s = settings(epochs=epochs, workers=2)
    data_uri, ground_truth = find_training_data(data)
    source = Path(archive_source) if archive_source else _shared_data() / "ham10000" / "images"
    run_date = datetime.now(timezone.utc).date().isoformat()
    root = Path(workdir).resolve()  # Ray's workers need absolute paths
    models, scores, archive = root / "models", root / "scores", root / "archive" / run_date
    log.info("starting a local SeaweedFS S3 server (data in %s) and a local Ray", root / "seaweedfs")
    server = SeaweedServer(root / "seaweedfs")
    server.start()
    os.environ.update(server.env())
    try:
        runtime.connect(verbose=verbose)
        if not storage.exists(f"s3://{BUCKET}"):  # a rerun finds it there
            server.make_bucket(BUCKET)
        _split(data_uri, ground_truth, s.seed, s.val_fraction)
        _augment(s.seed)
        _train(s, models)
        _archive(source, archive, archive_images, s.seed)
        summary = _score(s, models, archive, scores, run_date)
    finally:
        runtime.disconnect()
        server.stop()
    riskiest = query.query(str(scores), date=run_date, top=10).select(["image_id", "melanoma_risk", "flagged", "predicted_class"])
    return summary | {"riskiest": riskiest, "workdir": workdir}


def closing_lines(result: dict) -> str:
    """The ten riskiest images, the commands that read the outputs, the summary."""
    root, night = result["workdir"], result["run_date"]
    return "\n".join([
        "",
        "The ten riskiest images of the night:",
        query.format_table(result["riskiest"], "table"),
        "",
        f"Everything stays in {root}/; with the venv active (source .venv/bin/activate), read it with:",
        f"  melanoma query {root}/scores --date {night} --flagged --top 20",
        f"  melanoma report {root}/scores --date {night} --model {root}/models --out {root}/report-{night}.html",
        f"  melanoma report --model {root}/models --out {root}/model-card.html",
        console.summary_line(result),
    ])  # fmt: skip
