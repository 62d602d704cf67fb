"""The process a command runs in: its console session, its Ray connection, and progress bars that Ray
workers advance from wherever they run.

Ray Train and Ray Data have no driver-side callback for a worker's progress, so a worker puts its progress
on a Ray queue (`Feed`) and a driver thread draws it as a bar on the terminal (`remote_progress`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

from melanoma import console

_worker_logs: str | None = None  # Ray's log directory of this session (worker output) once connected


@contextlib.contextmanager
def session(command: str, verbose: bool, log_file: bool) -> Iterator[None]:
    """One command's console. With log_file (a command that runs Ray or TensorFlow), third-party logs go to a
    log file the last line names; verbose shows every log here instead. Ray is disconnected at the end, before
    that last line (Ray's log thread would otherwise print after it)."""
    if verbose:
        console.verbose()
    elif not log_file:
        console.plain()
    if verbose or not log_file:
        try:
            yield
        finally:
            disconnect()
        return
    with console.quiet(command) as log_path:
        try:
            yield
        finally:
            disconnect()  # inside quiet(): Ray's shutdown messages go to the log file
            workers = f"; Ray workers' logs: {_worker_logs}" if _worker_logs else ""
            print(f"logs: {log_path}{workers} (--verbose shows them here)", file=console.terminal())


def connect(address: str | None = None, verbose: bool = False, local_cpus: int = 4) -> None:
    """Joins the cluster at address/RAY_ADDRESS; without one, starts a local Ray. A local Ray is given more
    CPUs than the machine has (4 on 2 cores): training workers and Ray Data reads then never starve each other.
    Workers' output reaches this console only when verbose; Ray keeps it in its session logs either way."""
    import ray

    global _worker_logs
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        context = ray.init(address=address, log_to_driver=verbose)
    else:
        context = ray.init(num_cpus=local_cpus, include_dashboard=False, log_to_driver=verbose)
    session_dir = context.address_info.get("session_dir")
    _worker_logs = os.path.join(session_dir, "logs") if session_dir else None


def disconnect() -> None:
    """Ray's log directory stays named: the session's last line points to it after the disconnect."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


STOP = ("stop", 0, None)  # tells the bar's follower that no more items come


class Feed:
    """What a Ray worker holds to advance a bar on the driver (picklable: a Ray queue). The bar is for people:
    a queue that is gone (its node died) never fails the work that reports to it."""

    def __init__(self, queue):
        self._queue = queue

    def add(self, n: int, line: str | None = None) -> None:
        """n more units done; `line`, if given, is printed above the bar."""
        self._put(("add", n, line))

    def reach(self, done: int, line: str | None = None) -> None:
        """`done` units done in all (a resumed run starts past zero)."""
        self._put(("reach", done, line))

    def _put(self, item) -> None:
        from ray.exceptions import RayActorError

        try:
            self._queue.put_nowait(item)
        except RayActorError:
            pass


@contextlib.contextmanager
def remote_progress(total: int, desc: str, unit: str) -> Iterator[Feed]:
    """A bar on the terminal that workers advance through the yielded Feed; closed when the block ends."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # on the driver's node: a worker node that dies must not take the bar (and the workers' puts) with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    bar = console.progress(total=total, desc=desc, unit=unit)

    def draw(item) -> None:
        kind, n, line = item
        bar.update(n if kind == "add" else n - bar.n)
        if line:
            bar.write(line, file=console.terminal())

    def follow() -> None:
        try:
            while True:
                try:
                    item = queue.get(timeout=1)
                except Empty:
                    bar.refresh()  # the elapsed time moves on
                    continue
                if item == STOP:
                    return
                draw(item)
        except RayActorError:
            return

    thread = threading.Thread(target=follow, name=f"progress-{desc}", daemon=True)
    thread.start()
    try:
        yield Feed(queue)
    finally:
        # The workers' puts are synchronous, so STOP comes after every one of them: the bar ends drawn whole, at
        # once, rather than when the follower's wait times out.
        with contextlib.suppress(RayActorError):
            queue.put_nowait(STOP)
        thread.join(timeout=10)
        bar.close()
        queue.shutdown()
