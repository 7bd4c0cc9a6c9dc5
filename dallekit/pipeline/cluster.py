"""The Dask client every stage runs on: a LocalCluster sized to the machine, or an existing cluster."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator

from dallekit.config import ClusterConfig
from dallekit.errors import BadInputError


def _unguarded_script() -> str | None:
    """The script a local cluster's worker processes import, when it was run as a file (they re-run its unguarded code)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path if path and getattr(main, "__spec__", None) is None and not hasattr(sys, "ps1") else None


def _guard_message(script: str) -> str:
    return (f"{script}: starts a local Dask cluster when imported; Dask's worker processes import the script, "
            'so start the cluster under `if __name__ == "__main__":`')


@contextlib.contextmanager
def dask_client(config: ClusterConfig | None = None, quiet: bool = False) -> Iterator[distributed.Client]:  # noqa: F821
    """Yield a distributed Client: --scheduler / DASK_SCHEDULER_ADDRESS if given, else a LocalCluster."""
    from distributed import Client, LocalCluster

    config = config or ClusterConfig()
    address = config.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError, ValueError) as err:  # ValueError: not an address at all
            raise BadInputError(f"--scheduler {address}: cannot reach a Dask scheduler there ({err})") from None
        with client:
            if not quiet:
                print(f"dask: scheduler {address}, dashboard {client.dashboard_link}", file=sys.stderr)
            yield client
        return
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # a worker process importing the script
        raise SystemExit(f"dallekit: error: {_guard_message(sys.argv[0] or 'the script')}")
    workers = config.workers or os.cpu_count() or 1
    http = f"{config.host}:0"  # a free port; distributed parses no IPv6 literal here
    if config.processes:
        # the scheduler, nannies and workers listen on `host`; each worker's HTTP server follows its listen address
        bind = {"host": config.host}
    else:
        # in-process workers talk over inproc:// (a host would make them TCP), but their HTTP server then
        # has no address to follow and listens on every interface unless it is given one
        bind = {"worker_dashboard_address": http}
    try:
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=config.threads_per_worker,
            processes=config.processes,
            dashboard_address=http,
            silence_logs=logging.ERROR,
            **bind,
        )
    except (OSError, RuntimeError, ValueError) as err:  # most often a --host this machine has no interface for
        script = _unguarded_script()
        if config.processes and script and "Nanny failed to start" in str(err):
            raise BadInputError(_guard_message(script)) from None
        raise BadInputError(f"--host {config.host}: cannot start a local Dask cluster there ({str(err).splitlines()[0][:160]})") from None
    with cluster, Client(cluster) as client:
        if not quiet:
            print(f"dask: local cluster, {workers} workers, dashboard {client.dashboard_link}", file=sys.stderr)
        yield client


class LazyClient:
    """A Dask client that starts its cluster on first use, and can be stopped and used again (a new cluster then starts).

    Bad input and finished stages then never start a cluster; `dallekit run` stops it while a
    trainer runs in the driver, where idle workers would take about 5% of a core each from it
    (heartbeats, memory and system monitors) and keep the memory of the stages before.
    """

    def __init__(self, config: ClusterConfig):
        self._config, self._stack, self._client = config, contextlib.ExitStack(), None

    def __getattr__(self, name: str):
        if self._client is None:
            self._client = self._stack.enter_context(dask_client(self._config))
        return getattr(self._client, name)

    def stop(self) -> None:
        """Shut the cluster down if it was started."""
        self._stack.close()
        self._client = None

    def __enter__(self) -> LazyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
