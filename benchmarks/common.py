"""Shared set-up for the benchmarks: generated images run through the real stages on loopback."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

# the stages' libraries are imported where they are used: train_vs_dalle_pytorch.py imports this
# module in the peer's venv, which has torch and dalle_pytorch but not pandas or Dask


def downloaded_shapes(work: Path, n: int, client, shard_size: int = 1000, threads: int = 16) -> Path:
    """Serve n generated JPEGs on 127.0.0.1, ingest and download them; returns the download folder."""
    import pandas as pd

    from dallekit.config import DownloadConfig, IngestConfig
    from dallekit.demo.synthetic import ShapesServer, make_dataset
    from dallekit.pipeline.download import download
    from dallekit.pipeline.ingest import ingest

    data = make_dataset(n, seed=0, broken_fraction=0.0, png_fraction=0.0)
    with ShapesServer(data.routes, max_seconds=3600) as server:
        urls = work / "urls.parquet"
        pd.DataFrame({"url": [server.url(r["path"]) for r in data.rows], "caption": [r["caption"] for r in data.rows]}).to_parquet(urls)
        ingest([str(urls)], str(work / "ingest"), IngestConfig(shard_size=shard_size), client)
        download(str(work / "ingest"), str(work / "download"), DownloadConfig(threads=threads), client)
    return work / "download"

BIN = Path(sys.executable).parent  # the venv's console scripts: dallekit, img2dataset


def run_command(cmd: list[str]) -> float:
    """Run a command to completion and return its wall time; exits with its stderr when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"}, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return seconds


def img2dataset_command(urls: Path, out: Path, processes: int, threads: int, shard_size: int, image_size: int = 256,
                        resize_mode: str = "center_crop") -> list[str]:
    """img2dataset's CLI on a Parquet URL list (url, caption), writing Parquet shards with dallekit download's defaults."""
    return [
        str(BIN / "img2dataset"), f"--url_list={urls}", "--input_format=parquet", "--url_col=url", "--caption_col=caption",
        "--output_format=parquet", f"--output_folder={out}", f"--processes_count={processes}", f"--thread_count={threads}",
        f"--image_size={image_size}", f"--resize_mode={resize_mode}", f"--number_sample_per_shard={shard_size}",
        "--enable_wandb=False", "--distributor=multiprocessing",
    ]


def successes(folder: Path) -> int:
    """Rows with status success in a folder of Parquet shards."""
    import pyarrow.parquet as pq

    files = [p for p in folder.glob("*.parquet") if not p.name.startswith("_")]
    return sum(int(pq.read_table(p, columns=["status"]).to_pandas()["status"].eq("success").sum()) for p in files)


def rss() -> int:
    """This process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss


def max_rss() -> int:
    """This process's peak resident memory since it started (VmHWM on Linux).

    Not ru_maxrss: through fork and exec it also counts the RSS of the process that spawned this
    one (a benchmark that has just written gigabytes of data before its Dask workers start).
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(results_path: Path, key: str, run) -> dict:
    """run() once per key: its result is kept in the results file, so a killed benchmark resumes where it was."""
    import json

    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if key not in results:
        results[key] = run()
        results_path.write_text(json.dumps(results, indent=1))
    print("\n".join(results[key]["lines"]), flush=True)
    return results[key]


def measured(run, client) -> tuple[float, int]:
    """(seconds, peak RSS of the largest worker in bytes) of run(); the RSS polled every 0.5 s and read as VmHWM."""
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


def alternate(rounds: int, peer: Callable[[], float], ours: Callable[[], float]) -> list[tuple[float, float]]:
    """Run the peer, then dallekit, `rounds` times (ABAB...); returns each round's (peer rate, dallekit rate).

    Each callable does one timed run and returns its rate (higher is better). Alternating in
    rounds and taking the median of the per-round ratios keeps a burst of other work on a
    shared machine from landing on one side only.
    """
    results = []
    for _ in range(rounds):
        results.append((peer(), ours()))
    return results


def print_rounds(results: list[tuple[float, float]], peer: str, ours: str, unit: str) -> float:
    """Print one line per round and, last, ratio=<median over rounds of dallekit rate / peer rate>; returns that median."""
    print(f"{'round':<7}{f'{peer} {unit}':>24}{f'{ours} {unit}':>24}{'ratio':>8}")
    for i, (a, b) in enumerate(results, 1):
        print(f"{i:<7}{a:>24.2f}{b:>24.2f}{b / a:>8.3f}")
    ratio = statistics.median(b / a for a, b in results)
    print(f"ratio={ratio:.3f}")
    return ratio
