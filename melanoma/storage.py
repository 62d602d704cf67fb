"""URI -> filesystem. A local path, a file:// URI and an s3://bucket/prefix URI behave the same everywhere.

S3 settings come from the standard AWS chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION); credentials are never read into our own code or logged.
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import uuid
from urllib.parse import urlparse

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from melanoma.config import settings
from melanoma.errors import MelanomaError


class StorageError(MelanomaError):
    """A one-line, user-facing storage problem (which URI, what was wrong)."""


class StorageUnavailable(StorageError):
    """The storage service itself failed (unreachable, timed out, throttling, 5xx), not the object: trying again
    later may well succeed, so a caller must never record this as a property of the object."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _local_path(uri: str) -> str:
    uri = str(uri)
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    return os.path.abspath(os.path.expanduser(uri))


def _endpoint() -> tuple[str | None, str | None]:
    """(host:port, scheme) from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, or (None, None) for AWS itself."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return None, None
    parsed = urlparse(url)
    return parsed.netloc, parsed.scheme or "https"


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, scheme: str | None, region: str, credentials: str) -> pafs.S3FileSystem:
    """One client per AWS settings and process: building one costs milliseconds, an image read far less; its
    timeouts and attempts are the Settings' when it is built. `credentials` (a digest of the AWS_* keys) is part
    of the cache key only so that changed keys get a new client."""
    s = settings()
    return pafs.S3FileSystem(
        region=region,
        endpoint_override=endpoint,
        scheme=scheme,
        connect_timeout=s.s3_connect_timeout,
        request_timeout=s.s3_request_timeout,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s.s3_max_attempts),
    )


def pyarrow_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for pyarrow.dataset, Ray Data and Ray Train storage."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), _local_path(uri)
    endpoint, scheme = _endpoint()
    keys = f"{os.environ.get('AWS_ACCESS_KEY_ID')}:{os.environ.get('AWS_SECRET_ACCESS_KEY')}:{os.environ.get('AWS_SESSION_TOKEN')}"
    fs = _s3(endpoint, scheme, _region(), hashlib.sha256(keys.encode()).hexdigest())
    return fs, str(uri)[len("s3://") :].rstrip("/")


def fsspec_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path inside it) for DuckDB and pandas."""
    if not is_s3(uri):
        return fsspec.filesystem("file"), _local_path(uri)
    endpoint, scheme = _endpoint()
    client_kwargs = {"region_name": _region()}
    if endpoint:
        client_kwargs["endpoint_url"] = f"{scheme}://{endpoint}"
    fs = fsspec.filesystem("s3", client_kwargs=client_kwargs, skip_instance_cache=True)
    return fs, str(uri)[len("s3://") :].rstrip("/")


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(_local_path(uri), *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of pyarrow_fs: a path inside fs back to a URI."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def explain(uri: str, exc: Exception) -> StorageError:
    """A storage failure (pyarrow's or botocore's exception) as a one-line StorageError naming uri; StorageUnavailable
    when the service failed rather than the object."""
    text = str(exc)
    # botocore names error codes AccessDenied, pyarrow (AWS C++ SDK) ACCESS_DENIED: compare both as accessdenied.
    codes = text.replace("_", "").lower()
    if "nosuchbucket" in codes or "bucket does not exist" in text.lower():
        bucket = urlparse(str(uri)).netloc
        return StorageError(f"{uri}: bucket '{bucket}' does not exist")
    if "accessdenied" in codes or "invalidaccesskeyid" in codes or "signaturedoesnotmatch" in codes:
        return StorageError(f"{uri}: access denied (check the AWS credentials in the environment)")
    if "Connection refused" in text or "curlCode" in text or "Couldn't connect" in text or "networkconnection" in codes:
        return StorageUnavailable(f"{uri}: cannot reach the S3 endpoint {os.environ.get('AWS_ENDPOINT_URL', 'of AWS')}")
    if any(code in codes.replace(" ", "") for code in _TRANSIENT_CODES):
        return StorageUnavailable(f"{uri}: S3 endpoint failed transiently ({_first_line(text)[:200]})")
    return StorageError(f"{uri}: {_first_line(text) or type(exc).__name__}")


# AWS SDK (pyarrow) and botocore names of service-side failures that say nothing about the object itself,
# compared like the codes above (lower case, no underscores).
_TRANSIENT_CODES = (
    "slowdown", "serviceunavailable", "internalfailure", "internalerror", "requesttimeout", "throttl",
    "httpstatus500", "httpstatus502", "httpstatus503", "httpstatus504",
)  # fmt: skip


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def info(uri: str) -> pafs.FileInfo:
    fs, path = pyarrow_fs(uri)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise explain(uri, exc) from None


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[pafs.FileInfo]:
    """Every file below uri (any nesting), sorted by path; hidden files are skipped. Raises if uri is missing."""
    fs, path = pyarrow_fs(uri)
    try:
        root = fs.get_file_info(path)
        if root.type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: no such file or directory")
        if root.type == pafs.FileType.File:
            infos = [root]
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise explain(uri, exc) from None
    files = [
        i
        for i in infos
        if i.type == pafs.FileType.File
        and not any(part.startswith(".") for part in i.path[len(path) :].split("/"))
        and (suffixes is None or i.path.lower().endswith(suffixes))
    ]
    return sorted(files, key=lambda i: i.path)


def read_bytes(uri: str) -> bytes:
    fs, path = pyarrow_fs(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as exc:
        raise explain(uri, exc) from None


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic for readers: local files go through a temp name and a rename; an S3 PUT is atomic by itself."""
    fs, path = pyarrow_fs(uri)
    try:
        if is_s3(uri):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise explain(uri, exc) from None


def check_writable(uri: str) -> None:
    """Fail early, before any work, when an output location cannot be written (missing bucket, bad keys)."""
    if not is_s3(uri):
        os.makedirs(_local_path(uri), exist_ok=True)
        return
    fs, path = pyarrow_fs(uri)
    bucket = path.split("/")[0]
    try:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: bucket '{bucket}' does not exist")
    except OSError as exc:
        raise explain(uri, exc) from None


def delete_dir(uri: str) -> None:
    fs, path = pyarrow_fs(uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except OSError as exc:
        raise explain(uri, exc) from None


def write_parquet(uri: str, data: pd.DataFrame | pa.Table) -> None:
    """One whole Parquet file (atomic like write_bytes); a Table keeps its own schema."""
    sink = pa.BufferOutputStream()
    pq.write_table(data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, preserve_index=False), sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


def read_table(uri: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(read_bytes(uri)))


def read_parquet(uri: str) -> pd.DataFrame:
    return read_table(uri).to_pandas()


def read_range(uri: str, offset: int, size: int) -> bytes:
    fs, path = pyarrow_fs(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read_at(size, offset)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as exc:
        raise explain(uri, exc) from None
