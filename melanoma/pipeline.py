"""`melanoma pipeline`: from the labelled data to the published default model, skipping steps already done.

ROOT holds isic-9class/Train/, labels/isic2019_training_ground_truth.csv, ham10000/ and isic-extra/ (as in
the project's shared data); W is the work dir, M the model registry, each local or s3://.

  split isic-9class (by lesion where HAM10000 knows it) ─► augment its training split (Augmentor)
  ─► add HAM10000 (by lesion) ─► add isic-extra (by patient / lesion) ─► [add the confirmed outcomes (by night)]
  ─► train, evaluate, calibrate, publish

With an outcome store (and the scores it confirms), its new confirmed images are added on every run, and a work dir
holding outcomes trains under a run name that includes its manifest's digest: new outcomes, a new model.
"""

from __future__ import annotations

import hashlib
import logging

from melanoma import augment, dataset, ham10000, registry, sources, storage, train
from melanoma.config import Settings

log = logging.getLogger(__name__)

NINE_CLASS = "isic-9class/Train"
GROUND_TRUTH = "labels/isic2019_training_ground_truth.csv"
HAM = "ham10000"
EXTRA = "isic-extra"
# Held-out shares per source: (validation, test). HAM10000's reproduce its earlier split (HAM-test).
HELD_OUT = {HAM: (0.1, 0.1), EXTRA: (0.1, 0.15), sources.OUTCOMES: (0.1, 0.2)}


def check_root(root: str) -> None:
    for part in (NINE_CLASS, GROUND_TRUTH, f"{HAM}/{ham10000.METADATA}", f"{EXTRA}/labels.csv"):
        if not storage.exists(storage.join(root, part)):
            raise dataset.DatasetError(
                f"{storage.join(root, part)}: missing (the data root needs isic-9class/Train/, labels/, ham10000/, isic-extra/)"
            )


def prepare(s: Settings, root: str, work: str, outcomes_uri: str | None = None, scores_uri: str | None = None) -> dict:
    """Split, augment and add the sources into `work`; each step is skipped when its output is there. The outcomes
    (outcomes_uri, confirming rows of scores_uri) are added whenever they hold images new to `work`."""
    check_root(root)
    done = {}
    if storage.exists(storage.join(work, dataset.MANIFEST)):
        log.info("step 1/4 split: %s already has a manifest, skipped", work)
    else:
        log.info("step 1/4 split: %s", storage.join(root, NINE_CLASS))
        dataset.make_split(storage.join(root, NINE_CLASS), work, s.val_fraction, s.seed,
                           storage.join(root, GROUND_TRUTH), storage.join(root, HAM, ham10000.METADATA))
    if augment.read_augmented(work) is not None:
        log.info("step 2/4 augment: %s already has augmented samples, skipped", work)
    else:
        log.info("step 2/4 augment: Augmentor, every class of the 9-class training split up to the largest")
        augment.augment_work_dir(work, s.seed)
    log.info("step 3/4 sources: %s, %s", HAM, EXTRA)
    done[HAM] = sources.add_source(work, HAM, lambda: ham10000.read_source(storage.join(root, HAM)), *HELD_OUT[HAM], s.seed)
    extra = storage.join(root, EXTRA)
    done[EXTRA] = sources.add_source(
        work, EXTRA, lambda: sources.read_labels(storage.join(extra, "labels.csv"), storage.join(extra, "images"), EXTRA),
        *HELD_OUT[EXTRA], s.seed,
    )
    if outcomes_uri:
        log.info("step 3/4 sources: outcomes %s, as scored in %s", outcomes_uri, scores_uri)
        done[sources.OUTCOMES] = sources.add_outcomes(work, outcomes_uri, scores_uri, *HELD_OUT[sources.OUTCOMES], s.seed)
    return done


def run(s: Settings, root: str, work: str, model_dir: str, outcomes_uri: str | None = None, scores_uri: str | None = None) -> dict:
    """Prepare `work`, then train and publish the model of settings `s`; returns its card. A model already
    published from the same run is not trained again."""
    prepare(s, root, work, outcomes_uri, scores_uri)
    run_name = train.run_name_for(s, work)
    if sources.OUTCOMES in sources.read_sources(work):
        run_name += "-" + hashlib.sha256(storage.read_bytes(storage.join(work, dataset.MANIFEST))).hexdigest()[:8]
    published = _published(model_dir, run_name)
    if published:
        log.info("step 4/4 train: run %s already published as %s, skipped", run_name, published["version"])
        return published
    log.info("step 4/4 train: %s, %d epochs", s.arch, s.epochs)
    return train.train(s, work, model_dir, run_name=run_name)


def _published(model_dir: str, run_name: str) -> dict | None:
    """The newest version the run published, whether or not it was promoted to `latest`."""
    if not storage.exists(model_dir):
        return None
    for version in reversed(registry.versions(model_dir)):
        card = registry.read_card(storage.join(model_dir, version))
        if card.get("run_name") == run_name:
            return card
    return None
