"""One typed home for every setting: defaults here, overridden by MELANOMA_* variables, then by CLI flags."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import typing
from dataclasses import dataclass

from melanoma.errors import MelanomaError

# Class folder names of the 9-class ISIC dataset, in the order of the model's outputs.
CLASS_NAMES: tuple[str, ...] = (
    "actinic keratosis",
    "basal cell carcinoma",
    "dermatofibroma",
    "melanoma",
    "nevus",
    "pigmented benign keratosis",
    "seborrheic keratosis",
    "squamous cell carcinoma",
    "vascular lesion",
)
MELANOMA = "melanoma"

# ISIC 2019 ground-truth codes and the class folders each one agrees with.
# ISIC 2019 files seborrheic keratoses under BKL, so BKL agrees with two folders.
GROUND_TRUTH_CODES: dict[str, tuple[str, ...]] = {
    "AK": ("actinic keratosis",),
    "BCC": ("basal cell carcinoma",),
    "DF": ("dermatofibroma",),
    "MEL": ("melanoma",),
    "NV": ("nevus",),
    "BKL": ("pigmented benign keratosis", "seborrheic keratosis"),
    "SCC": ("squamous cell carcinoma",),
    "VASC": ("vascular lesion",),
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Architectures in melanoma/model.py; "default" names the best measured recipe (docs/quality.md).
DEFAULT_ARCH = "efficientnet-lite0"
ARCHS = ("default", "seed-cnn", "residual-sep", "residual-sep-v2", "efficientnet-lite0")
# Inference engines in melanoma/engine.py.
ENGINES = ("auto", "keras", "tflite")


def snake_case(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


@dataclass(frozen=True)
class Settings:
    seed: int = 42
    # Where the nightly job reads and writes (embedded defaults of the demo; s3:// or local)
    archive_uri: str = "s3://melanoma/archive"
    scores_uri: str = "s3://melanoma/scores"
    # The scoring job's bookkeeping (input lists, staged files, checkpoints) while a night runs: outside the scores
    # dataset, on the same storage, one place per dataset; "" = the sibling prefix <scores>_work (layout.py)
    work_uri: str = ""
    model_uri: str = "s3://melanoma/models"
    # 128: the default recipe's input (docs/quality.md); scoring resizes to this before the model
    image_size: int = 128
    val_fraction: float = 0.2
    # Training
    arch: str = "default"
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 3e-4
    workers: int = 2
    gpus_per_worker: float = 0.0
    patience: int = 4
    # Recipe knobs (docs/quality.md). lr_schedule: "constant" or "cosine" (one warm-up epoch, then cosine decay
    # to 1% of learning_rate over `epochs`). freeze_blocks: the pretrained stem and this many leading MBConv
    # blocks stay fixed (0 = the whole network trains). epoch_images: images drawn per epoch (at most the
    # training set's size; 0 = the training set's size), each with probability proportional to n_class ** -balance_power (0 = as found, 1 = every
    # class equally often). lowres_share of the drawn images are shrunk to a random side between
    # lowres_min_side and image_size and enlarged back, so that blur (the 84 px BCN thumbnails) carries no label.
    # threads_per_worker: TensorFlow threads per training worker (0 = the machine's cores divided by the workers).
    lr_schedule: str = "cosine"
    freeze_blocks: int = 0
    epoch_images: int = 8000
    balance_power: float = 0.5
    lowres_share: float = 0.5
    lowres_min_side: int = 64
    threads_per_worker: int = 0
    # Images decoded per Ray Data task when loading a training split, and per predict call when evaluating.
    decode_batch_size: int = 64
    target_sensitivity: float = 0.90
    # Promotion gate (docs/promotion.md): a candidate replaces `latest` only if the 2.5th percentile of a paired
    # bootstrap of its melanoma AUC minus latest's is at least -promote_auc_margin, its sensitivity at its own
    # threshold at least min(latest's, target_sensitivity) - promote_sensitivity_margin, and its ECE at most
    # latest's + promote_ece_margin.
    promote_auc_margin: float = 0.02
    promote_sensitivity_margin: float = 0.05
    promote_ece_margin: float = 0.03
    promote_bootstrap_draws: int = 1000
    # Scoring
    score_batch_size: int = 64
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    # "auto": the TF-Lite export on CPU actors (when the version has one), Keras on GPU actors; or "keras", "tflite".
    engine: str = "auto"
    # Drift watch (docs/drift.md): a night's figure has moved when its population stability index against the
    # model's validation set is at least drift_psi and a chi-square test of homogeneity gives p below drift_p_value.
    drift_psi: float = 0.25
    drift_p_value: float = 0.001
    # Concurrent reads per prepare batch: hides S3 request latency (each read waits on the network, not a CPU).
    fetch_threads: int = 8
    # Tar shards read at once when an archive is listed (a shard is read through for its member headers).
    list_threads: int = 8
    # Files read and hashed at once when a labelled dataset is audited, split or added to.
    hash_threads: int = 16
    rows_per_file: int = 5000  # at most; a killed run loses at most one unwritten file per write task
    max_image_pixels: int = 64_000_000  # larger declared sizes are refused as decompression bombs
    max_decoded_side: int = 1024  # larger images are downscaled on decode to bound memory
    # A run in which no batch is scored for this long is aborted with a clear error (score.StalledError); it counts
    # from the start of the Ray Data pipeline, so it must cover starting the actors and loading the model.
    score_stall_seconds: int = 600
    # S3 client (storage): seconds to connect and per request, and attempts per call; a refused connection
    # fails in milliseconds, a frozen endpoint after about request timeout x attempts (docs/reliability.md).
    s3_connect_timeout: float = 5.0
    s3_request_timeout: float = 30.0
    s3_max_attempts: int = 3


class SettingsError(MelanomaError):
    """A MELANOMA_* variable whose value does not fit its setting."""


def settings(**overrides) -> Settings:
    """Defaults, then MELANOMA_<FIELD> environment variables, then explicit overrides (None is ignored)."""
    kinds = _field_types()
    values = {}
    for field in dataclasses.fields(Settings):
        variable = f"MELANOMA_{field.name.upper()}"
        if variable in os.environ:
            values[field.name] = parse(variable, os.environ[variable], kinds[field.name])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


@functools.cache
def _field_types() -> dict[str, type]:
    return typing.get_type_hints(Settings)  # resolves the annotations, which are strings here (about 0.2 ms)


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse(variable: str, raw: str, kind: type) -> bool | int | float | str:
    """The value of an environment variable as the setting's type; SettingsError naming the variable if it is not one."""
    text = raw.strip().lower()
    if kind is bool:
        if text in TRUE + FALSE:
            return text in TRUE
        raise SettingsError(f"{variable}={raw!r} is not a boolean (one of {', '.join(TRUE + FALSE)})")
    if kind is str:
        return raw
    try:
        return kind(text)
    except ValueError:
        raise SettingsError(f"{variable}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
