"""Shared set-up for the benchmarks: generated images run through the real stages on loopback."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dallekit.config import DownloadConfig, IngestConfig
from dallekit.pipeline.download import download
from dallekit.pipeline.ingest import ingest
from dallekit.synthetic import ShapesServer, make_dataset


def downloaded_shapes(work: Path, n: int, client, shard_size: int = 1000, threads: int = 16) -> Path:
    """Serve n generated JPEGs on 127.0.0.1, ingest and download them; returns the download folder."""
    data = make_dataset(n, seed=0, broken_fraction=0.0, png_fraction=0.0)
    with ShapesServer(data.routes, max_seconds=3600) as server:
        urls = work / "urls.parquet"
        pd.DataFrame({"url": [server.url(r["path"]) for r in data.rows], "caption": [r["caption"] for r in data.rows]}).to_parquet(urls)
        ingest([str(urls)], str(work / "ingest"), IngestConfig(shard_size=shard_size), client)
        download(str(work / "ingest"), str(work / "download"), DownloadConfig(threads=threads), client)
    return work / "download"
