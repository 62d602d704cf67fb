"""Image archives: a prefix (local or s3://) of loose JPEG/PNG files, any nesting, and/or tar shards of them.

Listing turns an archive into input rows; a tar member is addressed as `<shard uri>#<member name>` with
its byte range inside the shard, so no shard is ever unpacked to disk. Scoring fetches a batch of rows at
once (`fetch_all`): reads from object storage overlap on threads, so a worker waits for one request latency per
batch rather than per image, and neighbouring members of one shard come in one ranged read rather than one read
each. A reader of the scores fetches images by the URIs the rows carry (`fetch_uris`), through the same reads.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from melanoma import storage
from melanoma.config import IMAGE_SUFFIXES, settings

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar",)
INPUT_COLUMNS = ["image_uri", "image_id", "shard_uri", "offset", "size"]
# Members of one shard less than MAX_GAP bytes apart (tar headers and padding lie between them) are read in one
# ranged read of at most MAX_SPAN bytes; the bytes between them are read and dropped.
MAX_GAP = 64 * 1024
MAX_SPAN = 8 * 1024 * 1024


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
        raise storage.explain(uri, exc) from None
    return rows


def list_inputs(archive_uri: str) -> tuple[pd.DataFrame, int]:
    """(one row per input image in path order, number of other files skipped). Raises StorageError if the
    prefix is missing. Shards are read Settings.list_threads at a time."""
    entries, shards, skipped = [], [], 0
    fs, _ = storage.pyarrow_fs(archive_uri)
    for f in storage.list_files(archive_uri):
        uri = storage.to_uri(fs, f.path)
        name = f.path.lower()
        if name.endswith(IMAGE_SUFFIXES):
            entries.append([{"image_uri": uri, "image_id": image_id(f.path), "shard_uri": None, "offset": None, "size": f.size}])
        elif name.endswith(SHARD_SUFFIXES):
            entries.append(uri)
            shards.append(uri)
        else:
            skipped += 1
    with ThreadPoolExecutor(settings().list_threads) as pool:
        members = dict(zip(shards, pool.map(_shard_members, shards)))
    rows = [row for entry in entries for row in (members[entry] if isinstance(entry, str) else entry)]
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


def _spans(rows: pd.DataFrame) -> list[tuple[list[int], str, int | None, int | None]]:
    """Reads that cover `rows`: (row positions, uri, offset, size); offset None reads a whole object."""
    spans = []
    loose = rows["shard_uri"].isna().to_numpy()
    for i in loose.nonzero()[0]:
        spans.append(([int(i)], rows["image_uri"].iat[i], None, None))
    members = rows.assign(_pos=range(len(rows)))[~loose].sort_values(["shard_uri", "offset"], kind="stable")
    for shard, group in members.groupby("shard_uri", sort=False):
        current: list[int] = []
        start = end = 0
        for pos, offset, size in zip(group["_pos"], group["offset"].astype(int), group["size"].astype(int)):
            if current and (offset - end > MAX_GAP or offset + size - start > MAX_SPAN):
                spans.append((current, shard, start, end - start))
                current = []
            if not current:
                start = end = offset
            current.append(int(pos))
            end = max(end, offset + size)
        spans.append((current, shard, start, end - start))
    return spans


def fetch_all(rows: pd.DataFrame, threads: int) -> list[bytes | storage.StorageError]:
    """The bytes of each row (INPUT_COLUMNS), in order, or the StorageError saying why it could not be read.
    StorageUnavailable (the service, not the object) is raised instead: no row may record it."""

    def read(span):
        positions, uri, offset, size = span
        try:
            data = storage.read_bytes(uri) if offset is None else storage.read_range(uri, offset, size)
        except storage.StorageUnavailable:
            raise
        except storage.StorageError as exc:
            return [(p, exc) for p in positions]
        if offset is None:
            return [(positions[0], data)]
        return [(p, data[int(rows["offset"].iat[p]) - offset :][: int(rows["size"].iat[p])]) for p in positions]

    out: list[bytes | storage.StorageError] = [b""] * len(rows)
    spans = _spans(rows)
    remote = [span for span in spans if storage.is_s3(span[1])]
    # Local reads are not worth a thread each: starting the threads costs more than the reads.
    results = [read(span) for span in spans if not storage.is_s3(span[1])]
    if remote:
        pool = ThreadPoolExecutor(max(threads, 1))
        try:
            results.extend(pool.map(read, remote))
        finally:
            pool.shutdown(cancel_futures=True)  # after a StorageUnavailable, no more reads against a dead endpoint
    for result in results:
        for position, value in result:
            out[position] = value
    return out


def fetch_uris(image_uris: list[str], threads: int) -> list[bytes | storage.StorageError]:
    """The bytes of each image named by its URI (a loose file, or `<shard uri>#<member>` as listing names it), in
    order, or the StorageError saying why not, as fetch_all reads them. A shard is listed once for all its members."""
    rows, missing = locate(image_uris)
    fetched = missing | dict(zip(rows["image_uri"], fetch_all(rows, threads)))
    return [fetched[uri] for uri in image_uris]


def locate(image_uris: list[str]) -> tuple[pd.DataFrame, dict[str, storage.StorageError]]:
    """(input rows of the images that can be located, INPUT_COLUMNS; the StorageError of each that cannot)."""
    shard_of = {uri: shard for uri in image_uris if (shard := _shard_of(uri))}
    rows = [_loose(uri) for uri in image_uris if uri not in shard_of]
    missing: dict[str, storage.StorageError] = {}
    for shard in sorted(set(shard_of.values())):
        wanted = [uri for uri, of in shard_of.items() if of == shard]
        try:
            members = {r["image_uri"]: r for r in _shard_members(shard)}
        except storage.StorageError as exc:
            missing |= dict.fromkeys(wanted, exc)
            continue
        rows += [members[uri] for uri in wanted if uri in members]
        missing |= {uri: storage.StorageError(f"{uri}: no such member in the shard") for uri in wanted if uri not in members}
    return pd.DataFrame(rows, columns=INPUT_COLUMNS), missing


def _loose(uri: str) -> dict:
    return {"image_uri": uri, "image_id": image_id(uri), "shard_uri": None, "offset": None, "size": None}


def _shard_of(image_uri: str) -> str | None:
    """The shard of a `<shard>.tar#<member>` URI, None for a loose file."""
    for suffix in SHARD_SUFFIXES:
        shard, found, _ = image_uri.partition(f"{suffix}#")
        if found:
            return shard + suffix
    return None
