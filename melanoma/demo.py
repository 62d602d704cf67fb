"""`melanoma demo`: the whole flow on one machine with embedded defaults.

A local SeaweedFS S3 server and a local Ray; audit -> split -> augment -> train briefly -> upload a sample
archive -> nightly score -> the ten riskiest images. Everything stays under ./.demo (S3 data, a local copy of
the scores); rerunning resumes: a finished step is not done again.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from datetime import datetime, timezone
from pathlib import Path

from melanoma import augment, dataset, layout, registry, runtime, score, storage, train
from melanoma.config import settings
from melanoma.services import SeaweedServer

log = logging.getLogger(__name__)

BUCKET = "melanoma"
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


def _sample_archive(source: Path, n: int, seed: int) -> list[Path]:
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return random.Random(seed).sample(files, min(n, len(files)))


def run(data: str | None, archive_source: str | None, epochs: int, archive_images: int, workdir: str = ".demo") -> dict:
    """Returns the nightly run summary; logs one line per step."""
    s = settings(epochs=epochs, workers=2)
    data_uri, ground_truth = find_training_data(data)
    ham = Path(archive_source) if archive_source else _shared_data() / "ham10000" / "images"
    run_date = datetime.now(timezone.utc).date().isoformat()
    root = Path(workdir).resolve()
    server = SeaweedServer(root / "seaweedfs")
    server.start()
    os.environ.update(server.env())
    try:
        runtime.connect()
        if not storage.exists(f"s3://{BUCKET}"):  # a rerun finds it there
            server.make_bucket(BUCKET)
        work, models = f"s3://{BUCKET}/work", f"s3://{BUCKET}/models"
        archive = f"s3://{BUCKET}/archive/{run_date}"
        scores = f"s3://{BUCKET}/scores"

        log.info("step 1/6: audit and split %s", data_uri)
        report = dataset.audit_uri(data_uri, ground_truth)
        log.info("%d files, %d unique, %d duplicate groups, %d with conflicting labels (%s)",
                 report["files"], report["unique_images"], report["duplicate_groups"], report["conflicting_groups"],
                 f"resolved from {ground_truth} where it names one folder" if ground_truth else "dropped")
        if not storage.exists(storage.join(work, dataset.MANIFEST)):
            dataset.make_split(data_uri, work, s.val_fraction, s.seed, ground_truth)

        log.info("step 2/6: augment the training split (every class to the largest)")
        if augment.read_augmented(work) is None:
            augment.augment_work_dir(work, s.seed)

        log.info("step 3/6: train %s for %d epochs on Ray Train (2 workers)", s.arch, s.epochs)
        if not storage.exists(storage.join(models, registry.LATEST)):
            train.train(s, work, models)
        card = registry.read_card(models)
        log.info("model %s: melanoma AUC %.3f on validation", card["version"], card["metrics"]["melanoma_auc"] or float("nan"))

        log.info("step 4/6: upload %d archive images to %s", archive_images, archive)
        if not storage.exists(archive):
            for path in _sample_archive(ham, archive_images, s.seed):
                storage.write_bytes(storage.join(archive, path.name), path.read_bytes())

        log.info("step 5/6: nightly scoring of %s", archive)
        summary = score.score(s, models, archive, scores, run_date)

        log.info("step 6/6: copy the scores to %s/scores", root)
        local = root / "scores" / f"run_date={run_date}"
        shutil.rmtree(local, ignore_errors=True)
        fs, path = storage.pyarrow_fs(layout.partition(scores, run_date))
        for f in storage.list_files(layout.partition(scores, run_date)):
            target = local / f.path[len(path) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(storage.read_bytes(storage.to_uri(fs, f.path)))
        return summary | {"local_scores": str(root / "scores")}
    finally:
        server.stop()
