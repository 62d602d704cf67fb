"""One model from several published ones: the mean of their class probabilities, recalibrated (temperature
and alert threshold) on a validation split, and published like a trained model.

Members may differ in seed or recipe; they must share classes and input size, and none may have trained
on an image of the validation split, or its temperature and threshold would be fitted on images it has seen.
Scoring an ensemble of k members costs k times the model compute of one.
"""

from __future__ import annotations

import dataclasses
import logging

import pandas as pd

from melanoma import dataset, registry, storage, train
from melanoma.config import Settings

log = logging.getLogger(__name__)

ARCH = "ensemble"


def build(members: list):
    """Built-in layers only (nested models and Average), so the result loads with `safe_mode=True`."""
    import keras

    inputs = keras.Input(shape=(None, None, 3), name="image")
    # each member renamed: two members of the same architecture would otherwise share a name
    renamed = [keras.Model(m.input, m.output, name=f"member_{i}") for i, m in enumerate(members)]
    outputs = keras.layers.Average(name="probabilities")([m(inputs) for m in renamed])
    return keras.Model(inputs, outputs, name=ARCH)


def _check_members(loaded: list[registry.LoadedModel]) -> None:
    first = loaded[0]
    for other in loaded[1:]:
        for key in ("class_names", "input_size"):
            if other.card.get(key) != first.card.get(key):
                raise registry.ModelError(
                    f"{other.uri}: {key.replace('_', ' ')} {other.card.get(key)} does not match {first.uri} ({first.card.get(key)})"
                )


def _check_unseen(loaded: list[registry.LoadedModel], val_rows: pd.DataFrame, data_uri: str) -> None:
    """By image id and by content: a copy of a validation image under another name counts as seen."""
    tables = {uri: train.training_tables(uri)[0] for uri in {m.card["data_uri"] for m in loaded}}  # seeds share a data dir
    for member in loaded:
        trained_on = tables[member.card["data_uri"]]
        seen = val_rows[val_rows["image_id"].isin(trained_on["image_id"]) | val_rows["sha256"].isin(trained_on["sha256"])]
        if len(seen):
            raise dataset.DatasetError(
                f"{member.uri}: trained on {len(seen)} of the {len(val_rows)} validation images of {data_uri} "
                f"(e.g. {seen['image_id'].iloc[0]}); calibrate the ensemble on a split none of its members trained on"
            )


def combine(s: Settings, member_uris: list[str], data_uri: str, model_dir: str) -> dict:
    """Load, check, average, calibrate on `data_uri`'s validation split, publish. Returns the card."""
    if len(member_uris) < 2:
        raise registry.ModelError(f"an ensemble needs at least two models, got {len(member_uris)}")
    storage.check_writable(model_dir)
    loaded = [registry.load(uri) for uri in member_uris]
    _check_members(loaded)
    _, val_rows = train.training_tables(data_uri)
    _check_unseen(loaded, val_rows, data_uri)
    s = dataclasses.replace(s, image_size=loaded[0].card["input_size"][0])
    log.info("averaging %d models, calibrating on %d validation images of %s", len(loaded), len(val_rows), data_uri)
    facts = {
        "arch": ARCH,
        "members": [
            {"version": m.card["version"], "model_sha256": m.card["model_sha256"], "arch": m.card.get("arch"),
             "data_uri": m.card.get("data_uri"), "seed": m.card.get("seed")}
            for m in loaded
        ],
        # what it cost to train the members one after another
        "training_seconds": round(sum(m.card.get("training_seconds", 0) for m in loaded), 1),
    }
    return train.publish_evaluated(build([m.model for m in loaded]), s, data_uri, val_rows, model_dir, facts)
