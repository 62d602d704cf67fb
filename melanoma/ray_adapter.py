"""Every use of Ray internals and of process-global Ray settings, in one place (tests/unit/test_ray_adapter.py
pins each of them, so an upgrade of Ray that changes one fails there first).

- Ray Data's on-disk checkpoint commit: a block's checkpoint is written as <id>.pending.parquet and committed by a
  move to <id>.parquet once the block's data files are written (ray.data.checkpoint.checkpoint_writer).
- DataContext, the process-global settings of Ray Data: set for one scoring run and restored after it.
- Ray's exception wrappers (RayTaskError): what a worker raised, found through their `.cause`, as the one-line error
  the CLI prints.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pyarrow.fs as pafs
from ray.data import DataContext
from ray.data.checkpoint import CheckpointConfig
from ray.data.checkpoint.checkpoint_writer import PENDING_CHECKPOINT_SUFFIX
from ray.exceptions import RayError

from melanoma import storage
from melanoma.errors import MelanomaError

PENDING = f"{PENDING_CHECKPOINT_SUFFIX}.parquet"
COMMITTED = ".parquet"


def interrupted_commits(names: set[str]) -> list[str]:
    """The pending checkpoint files (base names) whose committed twin exists too: their commit was cut between
    the copy and the delete of an S3 move, after the block's data files were written."""
    return sorted(n for n in names if n.endswith(PENDING) and f"{n[: -len(PENDING)]}{COMMITTED}" in names)


@contextlib.contextmanager
def run_context(
    id_column: str, checkpoint_uri: str, fs: pafs.FileSystem, stall_seconds: float, retried_io_errors: list[str]
) -> Iterator[None]:
    """Ray Data's settings for one checkpointed run of this process, restored afterwards:
    - a checkpoint per written block under checkpoint_uri, kept on success (the caller drops it after its commit);
    - I/O retried by Ray Data only for errors matching retried_io_errors;
    - the run aborted with ExecutionTimeoutError when nothing moves for stall_seconds;
    - the first Parquet reader (the second starts 32 footer-reader actors to read one small inputs file: 2-3 s of
      every run's start-up on 2 cores, docs/capacity.md);
    - an exception raised in a map function reaches the driver as itself (wrapped only by Ray's RayTaskError,
      whose `.cause` it is), not as Ray Data's UserCodeException, whose cause does not survive pickling."""
    ctx = DataContext.get_current()
    names = ("retried_io_errors", "execution_no_progress_timeout_s", "use_datasource_v2", "raise_original_map_exception")
    saved = {name: getattr(ctx, name) for name in names}
    ctx.checkpoint_config = CheckpointConfig(
        id_column=id_column, checkpoint_path=checkpoint_uri, override_filesystem=fs, delete_checkpoint_on_success=False
    )
    _set(ctx, {
        "retried_io_errors": retried_io_errors,
        "execution_no_progress_timeout_s": float(stall_seconds),
        "use_datasource_v2": False,
        "raise_original_map_exception": True,
    })  # fmt: skip
    try:
        yield
    finally:
        ctx.checkpoint_config = None
        _set(ctx, saved)


def _set(ctx: DataContext, values: dict) -> None:
    with warnings.catch_warnings():
        # "retried_io_errors using substring matching will be deprecated": the patterns given are literal text
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, value in values.items():
            setattr(ctx, name, value)


def raised(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions behind exc, outermost first, Ray's wrappers left out: for an error raised in a worker, the
    worker's own exception (a wrapper's str() is a traceback; what it wraps has the one-line message)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        todo += [getattr(e, "cause", None) if isinstance(e, RayError) else None, e.__cause__, e.__context__]
        if not isinstance(e, RayError):
            yield e


def user_error(exc: BaseException, uri: str) -> MelanomaError | None:
    """The one-line error behind a failed run (raised in this process or in a worker), else None: the project's own
    error, or a storage failure of pyarrow's S3 client explained for uri."""
    for e in raised(exc):
        if isinstance(e, MelanomaError):
            return type(e)(_first_line(e))  # Ray appends its retry notes to the message
        if isinstance(e, OSError) and ("AWS Error" in str(e) or "curlCode" in str(e)):
            return storage.explain(uri, e)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
