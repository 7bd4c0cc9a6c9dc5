"""The Dask client every stage runs on: a LocalCluster sized to the machine, or an existing cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from dallekit.config import BadInputError, ClusterConfig


@contextlib.contextmanager
def dask_client(config: ClusterConfig | None = None, quiet: bool = False) -> Iterator["distributed.Client"]:  # noqa: F821
    """Yield a distributed Client: --scheduler / DASK_SCHEDULER_ADDRESS if given, else a LocalCluster."""
    from distributed import Client, LocalCluster

    config = config or ClusterConfig()
    address = config.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise BadInputError(f"--scheduler {address}: cannot reach a Dask scheduler there ({err})") from None
        with client:
            if not quiet:
                print(f"dask: scheduler {address}, dashboard {client.dashboard_link}", file=sys.stderr)
            yield client
        return
    workers = config.workers or os.cpu_count() or 1
    loopback = {"host": "127.0.0.1"} if config.processes else {}  # in-process workers talk over inproc://
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=config.threads_per_worker,
        processes=config.processes,
        dashboard_address="127.0.0.1:0",  # a free port; loopback only
        silence_logs=logging.ERROR,
        **loopback,
    )
    with cluster, Client(cluster) as client:
        if not quiet:
            print(f"dask: local cluster, {workers} workers, dashboard {client.dashboard_link}", file=sys.stderr)
        yield client
