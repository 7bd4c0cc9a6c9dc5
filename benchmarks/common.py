"""Shared set-up for the benchmarks: generated images run through the real stages on loopback."""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import pandas as pd

from dallekit.config import DownloadConfig, IngestConfig
from dallekit.demo.synthetic import ShapesServer, make_dataset
from dallekit.pipeline.download import download
from dallekit.pipeline.ingest import ingest


def downloaded_shapes(work: Path, n: int, client, shard_size: int = 1000, threads: int = 16) -> Path:
    """Serve n generated JPEGs on 127.0.0.1, ingest and download them; returns the download folder."""
    data = make_dataset(n, seed=0, broken_fraction=0.0, png_fraction=0.0)
    with ShapesServer(data.routes, max_seconds=3600) as server:
        urls = work / "urls.parquet"
        pd.DataFrame({"url": [server.url(r["path"]) for r in data.rows], "caption": [r["caption"] for r in data.rows]}).to_parquet(urls)
        ingest([str(urls)], str(work / "ingest"), IngestConfig(shard_size=shard_size), client)
        download(str(work / "ingest"), str(work / "download"), DownloadConfig(threads=threads), client)
    return work / "download"


def rss() -> int:
    """This process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss


def max_rss() -> int:
    """This process's peak resident memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measured(run, client) -> tuple[float, int]:
    """(seconds, peak RSS of the largest worker in bytes) of run(); the RSS polled every 0.5 s and read as ru_maxrss."""
    peak, stop = [0], threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            try:
                peak[0] = max([peak[0], *client.run(rss).values()])
            except Exception:  # noqa: BLE001, S110 - a poll racing the cluster's shutdown: the next one counts
                pass

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    return seconds, max(peak[0], *client.run(max_rss).values())
