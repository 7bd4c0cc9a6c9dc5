"""clean + non-CLIP filter rows/s vs the download stage's rows/s, on the same data and machine.

Serves N generated JPEGs on 127.0.0.1, ingests them, then times `download`, `clean` and
`filter --no-clip` as stage functions on one local Dask cluster whose workers have already
imported the stages' libraries (cluster start-up and imports are not timed for any of them).
Alternates in rounds (ABAB...): A downloads into a fresh folder, B cleans and filters that
download into fresh folders. Prints each round's rows/s and, as its last line,
ratio=<median over rounds of (clean + filter) rows/s / download rows/s>. Target: >= 20.

    python benchmarks/clean_throughput.py [--n 5000] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import alternate, print_rounds

from dallekit.config import (
    CleanConfig,
    ClusterConfig,
    DownloadConfig,
    FilterConfig,
    IngestConfig,
)
from dallekit.demo.synthetic import ShapesServer, make_dataset
from dallekit.pipeline.clean import clean
from dallekit.pipeline.cluster import dask_client
from dallekit.pipeline.download import download
from dallekit.pipeline.filter import filter
from dallekit.pipeline.ingest import ingest


def timed(fn, *args) -> float:
    """Seconds of fn(*args), its output folder (the second argument) removed first."""
    shutil.rmtree(args[1], ignore_errors=True)
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def warm_up() -> None:
    """Import each stage's libraries and load its small models, as a long-running worker has."""
    import random

    import img2dataset.downloader  # noqa: F401

    from dallekit.demo.synthetic import encode, random_spec, render
    from dallekit.images import phash
    from dallekit.pipeline.clean import repair_caption
    from dallekit.pipeline.filter import caption_scores

    phash(encode(render(random_spec(random.Random(0), width=64, height=64))))
    caption_scores([repair_caption("a warm-up caption")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="images served")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16, help="download threads per shard task")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of download then clean + filter")
    args = parser.parse_args()

    data = make_dataset(args.n, seed=0, broken_fraction=0.0, png_fraction=0.0)
    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    with ShapesServer(data.routes, max_seconds=3600) as server, dask_client(ClusterConfig(workers=args.workers), quiet=True) as client:
        urls = work / "urls.parquet"
        pd.DataFrame({"url": [server.url(r["path"]) for r in data.rows], "caption": [r["caption"] for r in data.rows]}).to_parquet(urls)
        ingest([str(urls)], str(work / "ingest"), IngestConfig(shard_size=args.shard_size), client)
        client.run(warm_up)  # one-off imports and model loads per worker are not per-row throughput
        seconds: dict[str, list[float]] = {"clean": [], "filter": []}

        def download_rate() -> float:
            return args.n / timed(download, str(work / "ingest"), str(work / "download"), DownloadConfig(threads=args.threads), client)

        def clean_filter_rate() -> float:
            seconds["clean"].append(timed(clean, str(work / "download"), str(work / "clean"), CleanConfig(), client))
            seconds["filter"].append(timed(filter, str(work / "clean"), str(work / "filter"), FilterConfig(clip=False), client))
            return args.n / (seconds["clean"][-1] + seconds["filter"][-1])

        results = alternate(args.rounds, download_rate, clean_filter_rate)
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.n} rows, {args.workers} workers, {args.shard_size}-row shards")
    print(f"clean {args.n / statistics.median(seconds['clean']):.1f} rows/s, "
          f"filter --no-clip {args.n / statistics.median(seconds['filter']):.1f} rows/s (median over rounds)")
    print_rounds(results, "download", "clean + filter", "rows/s")


if __name__ == "__main__":
    main()
