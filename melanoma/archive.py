"""Image archives: a prefix (local or s3://) of loose JPEG/PNG files, any nesting, and/or tar shards of them.

Listing turns an archive into input rows; a tar member is addressed as `<shard uri>#<member name>` with
its byte range inside the shard, so fetching it is one ranged read and no shard is ever unpacked to disk.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile

import pandas as pd

from melanoma import storage
from melanoma.config import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar",)
INPUT_COLUMNS = ["image_uri", "image_id", "shard_uri", "offset", "size"]


def image_id(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def _shard_members(uri: str) -> list[dict]:
    """Image members of one tar shard with their data offsets; only headers are read (buffered ranged reads)."""
    fs, path = storage.pyarrow_fs(uri)
    rows = []
    try:
        with fs.open_input_file(path) as raw, tarfile.open(fileobj=io.BufferedReader(raw, 1 << 20), mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                    rows.append({
                        "image_uri": f"{uri}#{member.name}",
                        "image_id": image_id(member.name),
                        "shard_uri": uri,
                        "offset": member.offset_data,
                        "size": member.size,
                    })
    except tarfile.TarError as exc:
        raise storage.StorageError(f"{uri}: not a readable tar shard ({exc})") from None
    except OSError as exc:  # the shard itself could not be read (denied, endpoint down): one line, not a traceback
        raise storage._explain(uri, exc) from None
    return rows


def list_inputs(archive_uri: str) -> tuple[pd.DataFrame, int]:
    """(one row per input image, number of other files skipped). Raises StorageError if the prefix is missing."""
    rows, skipped = [], 0
    fs, _ = storage.pyarrow_fs(archive_uri)
    for f in storage.list_files(archive_uri):
        uri = storage.to_uri(fs, f.path)
        name = f.path.lower()
        if name.endswith(IMAGE_SUFFIXES):
            rows.append({"image_uri": uri, "image_id": image_id(f.path), "shard_uri": None, "offset": None, "size": f.size})
        elif name.endswith(SHARD_SUFFIXES):
            rows.extend(_shard_members(uri))
        else:
            skipped += 1
    if skipped:
        log.info("%s: skipped %d files that are neither images (%s) nor tar shards", archive_uri, skipped, ", ".join(IMAGE_SUFFIXES))
    frame = pd.DataFrame(rows, columns=INPUT_COLUMNS)
    frame["offset"] = frame["offset"].astype("Int64")
    frame["size"] = frame["size"].astype("Int64")
    return frame, skipped


def fetch(image_uri: str, shard_uri: str | None, offset: int | None, size: int | None) -> bytes:
    """The bytes of one input: a whole object, or a byte range of a tar shard."""
    if shard_uri is None or pd.isna(shard_uri):
        return storage.read_bytes(image_uri)
    return storage.read_range(shard_uri, int(offset), int(size))
