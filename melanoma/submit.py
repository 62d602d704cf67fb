"""`melanoma submit {train,nightly}`: run a job entrypoint (jobs/*.py) on a Ray cluster through the Jobs API.

One night, one job at a time. The submission id is derived from the job and its date:

    melanoma-nightly-score-2026-11-25            first attempt
    melanoma-nightly-score-2026-11-25-attempt-2  after the first one ended (FAILED, STOPPED or SUCCEEDED)
    melanoma-nightly-score-2026-11-25-attempt-3  ...

* While any attempt of that date is PENDING or RUNNING, a new submission is refused (exit 1, one line).
* Once every attempt has ended, the next one gets `-attempt-<N+1>`: Ray never accepts a submission id twice
  (not even after the job ended), so a rerun needs a new id. A rerun of the nightly job scores only what is
  missing from the partition (score.py's checkpoint + staging), so a rerun after a failure finishes the
  night exactly once, and a rerun of a finished night scores nothing.
* The check is race-free on one cluster: the id of the next attempt is max(N)+1 of the attempts listed, and
  Ray creates a submission id atomically (put-if-absent in the GCS), so two submitters that listed the same
  attempts collide on the same id and the loser is refused. The lock is per Ray cluster: a RayJob on its own
  KubeRay cluster (cluster/k8s/rayjob-nightly-score.yaml) does not see jobs on another cluster.

Nothing secret goes into the job: the runtime_env is the working dir and its excludes, no env_vars. The
cluster's nodes have their own S3 credentials (instance profile, IRSA; in the tests, the raylet's
environment) and the Ray token; the client reads RAY_AUTH_MODE=token / RAY_AUTH_TOKEN(_PATH) itself.

Waiting tails the job's logs to stdout; the exit code follows the job's final status: SUCCEEDED 0, else 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TextIO

from melanoma.errors import MelanomaError

log = logging.getLogger(__name__)

# job name -> (entrypoint script relative to the working dir, submission id prefix)
JOBS: dict[str, tuple[str, str]] = {
    "train": ("jobs/train.py", "melanoma-train"),
    "nightly": ("jobs/nightly_score.py", "melanoma-nightly-score"),
}

# Same patterns as cluster/runtime-env.yaml (tests/integration/test_cluster_jobs.py checks it is a superset),
# plus the demo's local S3 data. Ray also skips what .gitignore ignores.
EXCLUDES = [
    "/.venv", "/.git", "/build", "/dist", "/tests", "/data", "/models", "/.demo",
    "*.egg-info", "__pycache__", ".pytest_cache",
]  # fmt: skip

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # what `ray job submit` uses without --address / env
ACTIVE = ("PENDING", "RUNNING")


class SubmitError(MelanomaError):
    """A one-line reason why a job was not submitted (or could not be followed)."""


def resolve_date(text: str | None) -> str:
    """'yesterday' (UTC) or YYYY-MM-DD -> YYYY-MM-DD; None -> today (UTC)."""
    today = datetime.now(timezone.utc).date()
    if text is None or text == "today":
        return today.isoformat()
    if text == "yesterday":
        return (today - timedelta(days=1)).isoformat()
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise SubmitError(f"'{text}' is not a date YYYY-MM-DD (or 'yesterday')") from None


def base_id(job: str, run_date: str) -> str:
    return f"{JOBS[job][1]}-{run_date}"


def attempt_of(submission_id: str | None, base: str) -> int | None:
    """1 for `base`, N for `base-attempt-N`, None for any other id."""
    if submission_id == base:
        return 1
    m = re.fullmatch(re.escape(base) + r"-attempt-(\d+)", submission_id or "")
    return int(m.group(1)) if m else None


def attempts(client, base: str) -> dict[int, tuple[str, str]]:
    """{attempt number: (submission id, status)} of every job of this base id on the cluster."""
    found = {}
    for job in client.list_jobs():
        n = attempt_of(job.submission_id, base)
        if n is not None:
            found[n] = (job.submission_id, str(job.status))
    return found


def next_submission_id(client, base: str) -> str:
    """The id of the next attempt; SubmitError while an attempt is PENDING or RUNNING."""
    found = attempts(client, base)
    active = [(sid, status) for _, (sid, status) in sorted(found.items()) if status in ACTIVE]
    if active:
        what = "the same night" if base.startswith(JOBS["nightly"][1]) else "the same job and date"
        running = ", ".join(f"{sid} is {status}" for sid, status in active)
        raise SubmitError(f"{running}: {what} cannot run twice at once (follow it: `ray job logs --follow {active[-1][0]}`)")
    n = max(found, default=0) + 1
    return base if n == 1 else f"{base}-attempt-{n}"


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS (a dashboard URL, or a GCS host:port that Ray
    resolves to the dashboard), else http://127.0.0.1:8265 (as `ray job submit`)."""
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


@contextmanager
def _without_address_variables():
    """Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address: hide them while it
    is built, so that --address wins (it is resolved from them beforehand when not given)."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client_for(address: str | None):
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        with _without_address_variables():
            return JobSubmissionClient(url)
    except Exception as exc:  # connection refused, 401 without the token, a GCS address that does not answer
        raise SubmitError(f"cannot reach the Ray job API at {url}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray wraps server errors in tracebacks: the last meaningful line says what went wrong.
    return (lines[-1] if len(lines) > 1 and "Traceback" in text else " ".join(lines))[:500] or type(exc).__name__


def runtime_env(working_dir: str) -> dict:
    """The job's runtime_env: the checkout as working_dir (jobs/ and the melanoma package), nothing else."""
    return {"working_dir": working_dir, "excludes": list(EXCLUDES)}


def job_args(job: str, args: list[str], run_date: str | None) -> tuple[str, list[str]]:
    """(resolved run date, entrypoint args). The nightly job always gets `--date D` with D resolved here, so the
    submission id and the night the job scores agree even if the job starts after midnight."""
    args = list(args)
    if job != "nightly":
        return resolve_date(run_date), args
    given = None
    for i, a in enumerate(args):
        if a == "--date" and i + 1 < len(args):
            given, rest = args[i + 1], args[:i] + args[i + 2 :]
        elif a.startswith("--date="):
            given, rest = a.split("=", 1)[1], args[:i] + args[i + 1 :]
        else:
            continue
        break
    if given is None and run_date is None:
        raise SubmitError("the nightly job needs a date: --date YYYY-MM-DD or --date yesterday")
    if given is not None and run_date is not None and resolve_date(given) != resolve_date(run_date):
        raise SubmitError(f"two dates: --date {run_date} for the submission but --date {given} in the job arguments")
    d = resolve_date(run_date if run_date is not None else given)
    if given is not None:
        args = rest
    return d, ["--date", d, *args]


def submit(
    job: str,
    args: list[str],
    address: str | None = None,
    run_date: str | None = None,
    working_dir: str = ".",
    wait: bool = True,
    timeout: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Submit jobs/<job>.py to the cluster; 0 when it SUCCEEDED (or was submitted, with wait=False), else 1.

    address: the dashboard URL (http://head:8265) or a GCS host:port; default RAY_API_SERVER_ADDRESS, RAY_ADDRESS,
    then http://127.0.0.1:8265. run_date names the submission (nightly: the night scored; train: default today,
    UTC). timeout bounds the wait in seconds (the job keeps running on the cluster when it expires).
    Every refusal or failure is one line on stderr.
    """
    try:
        submission_id = _submit(job, args, address, run_date, working_dir)
    except SubmitError as exc:
        print(f"melanoma submit {job}: error: {exc}", file=sys.stderr)
        return 1
    out = out or sys.stdout
    print(f"submitted {submission_id}", file=out, flush=True)
    if not wait:
        return 0
    try:
        status, message = wait_for(address, submission_id, timeout, out)
    except SubmitError as exc:
        print(f"melanoma submit {job}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nstopped following {submission_id}; it keeps running: `ray job stop {submission_id}` stops it", file=sys.stderr)
        return 1
    if status == "SUCCEEDED":
        print(f"{submission_id} SUCCEEDED", file=out, flush=True)
        return 0
    first = (message or "").strip().splitlines()[:1]  # e.g. "Job entrypoint command failed with exit code 2, ..."
    reason = first[0].split(", last available logs")[0][:300] if first else "no message"
    print(f"melanoma submit {job}: error: {submission_id} {status}: {reason}", file=sys.stderr)
    return 1


def _submit(job: str, args: list[str], address: str | None, run_date: str | None, working_dir: str) -> str:
    if job not in JOBS:
        raise SubmitError(f"unknown job '{job}' (one of: {', '.join(JOBS)})")
    script = JOBS[job][0]
    if not (Path(working_dir) / script).is_file():
        raise SubmitError(f"{Path(working_dir).resolve()} has no {script}: run from the repo root or pass --working-dir")
    run_date, args = job_args(job, args, run_date)
    entrypoint = shlex.join(["python", script, *args])
    client = client_for(address)
    base = base_id(job, run_date)
    for _ in range(5):
        submission_id = next_submission_id(client, base)
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=runtime_env(working_dir),
                metadata={"melanoma_job": job, "run_date": run_date},
            )
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise SubmitError(f"submitting {submission_id} failed: {_one_line(exc)}") from None
            log.info("%s was taken meanwhile; checking again", submission_id)  # another submitter won the race
    raise SubmitError(f"could not find a free submission id for {base} after 5 tries")


def wait_for(address: str | None, submission_id: str, timeout: float | None, out: TextIO) -> tuple[str, str | None]:
    """Follow the job's logs until it ends; returns (final status, status message). SubmitError on timeout."""
    client = client_for(address)
    deadline = None if timeout is None else time.monotonic() + timeout

    def remaining() -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.0)

    async def follow() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(follow(), remaining()))
    except (asyncio.TimeoutError, TimeoutError):
        pass
    except Exception as exc:  # noqa: BLE001 - the log stream broke (dashboard restart, network): poll instead
        log.warning("log stream of %s broke (%s); polling its status", submission_id, _one_line(exc))
    # The stream ends when the job ends; the status can lag it by a moment.
    while True:
        info = client.get_job_info(submission_id)
        if info.status.is_terminal():
            return str(info.status), info.message
        left = remaining()
        if left is not None and left <= 0:
            raise SubmitError(
                f"{submission_id} still {info.status} after {timeout:.0f} s; it keeps running on the cluster "
                f"(`ray job logs --follow {submission_id}`, `ray job stop {submission_id}`)"
            )
        time.sleep(min(2.0, left) if left is not None else 2.0)
