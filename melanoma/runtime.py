"""Connecting to Ray: an address (or RAY_ADDRESS), an already connected driver, or a local Ray started here."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def connect(address: str | None = None, local_cpus: int = 4) -> None:
    """Joins the cluster at address/RAY_ADDRESS; without one, starts a local Ray. A local Ray is given more
    CPUs than the machine has (4 on 2 cores): training workers and Ray Data reads then never starve each other."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=local_cpus, include_dashboard=False)
    log.info("ray: %s", ray.get_runtime_context().gcs_address)
