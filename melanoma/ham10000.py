"""HAM10000 as a labelled source (melanoma/sources.py): `<root>/HAM10000_metadata.csv` (lesion_id, image_id,
dx) and `<root>/images/<image_id>.jpg`. Its 7 diagnoses are each one of the 9 classes; several images of one
lesion share a lesion_id, so the source is split by lesion."""

from __future__ import annotations

import io

import pandas as pd

from melanoma import dataset, storage
from melanoma.config import MELANOMA

NAME = "ham10000"
METADATA = "HAM10000_metadata.csv"
IMAGES_DIR = "images"
HAM_TO_CLASS = {
    "akiec": "actinic keratosis",
    "bcc": "basal cell carcinoma",
    "bkl": "pigmented benign keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "nevus",
    "vasc": "vascular lesion",
}


def read_source(ham_root: str) -> pd.DataFrame:
    """The metadata as source rows (image_id, uri, label, melanoma, group, source), as sources.read_labels gives."""
    uri = storage.join(ham_root, METADATA)
    meta = pd.read_csv(io.BytesIO(storage.read_bytes(uri)))
    missing = {"lesion_id", "image_id", "dx"} - set(meta.columns)
    if missing:
        raise dataset.DatasetError(f"{uri}: missing columns {', '.join(sorted(missing))}")
    unknown = sorted(set(meta["dx"]) - set(HAM_TO_CLASS))
    if unknown:
        raise dataset.DatasetError(f"{uri}: unknown dx '{unknown[0]}' (expected one of {', '.join(HAM_TO_CLASS)})")
    meta = meta.sort_values("image_id", ignore_index=True)
    label = meta["dx"].map(HAM_TO_CLASS)
    return pd.DataFrame({
        "image_id": meta["image_id"],
        "uri": [storage.join(ham_root, IMAGES_DIR, f"{i}.jpg") for i in meta["image_id"]],
        "label": label,
        "melanoma": (label == MELANOMA).astype(int),
        "group": NAME + "/lesion:" + meta["lesion_id"].astype(str),
        "source": NAME,
    })
