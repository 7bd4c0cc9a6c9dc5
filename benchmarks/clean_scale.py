"""clean over millions of rows of tiny downloaded images on a 3-worker LocalCluster: worker memory stays flat.

Writes N rows as a finished `download` stage (32x32 JPEGs, each its own picture, plus 3% exact
copies and 5% re-encoded near copies of earlier rows), runs `dallekit clean` on them on a fresh
LocalCluster of 3 workers and samples every worker's RSS every 0.5 s. For each size it prints
rows/s and the largest worker's peak RSS, saves the RSS timeline of the largest size as a PNG,
and ends with ratio=<peak worker RSS at the largest size / at the smallest> (flat: about 1).
The dedup's tasks hold up to 500,000 rows, so sizes from 1M up compare like with like.

    python benchmarks/clean_scale.py [--sizes 1000000,2000000] [--workers 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import rss  # noqa: E402

from dallekit.charts import line_chart  # noqa: E402
from dallekit.config import CleanConfig, ClusterConfig  # noqa: E402
from dallekit.pipeline.clean import clean  # noqa: E402
from dallekit.pipeline.cluster import dask_client  # noqa: E402

SIDE = 32


def jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def picture(rng: np.random.Generator) -> np.ndarray:
    """A random 4x4 colour pattern scaled to 32x32: distinct pHashes, a colour thumbnail of its own."""
    return np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((SIDE // 4, SIDE // 4, 1), np.uint8))


def write_shard(folder: Path, index: int, rows: int) -> int:
    """One downloaded-format shard of `rows` rows; copies refer to earlier rows of the same shard."""
    import hashlib

    rng = np.random.default_rng(index)
    images, pictures = [], []
    for i in range(rows):
        kind = rng.random()
        if i > 0 and kind < 0.03:
            images.append(images[rng.integers(0, i)])  # exact copy
        elif i > 0 and kind < 0.08:
            images.append(jpeg(pictures[rng.integers(0, len(pictures))], quality=75))  # the same picture re-encoded
        else:
            pictures.append(picture(rng))
            images.append(jpeg(pictures[-1], quality=90))
    uids = [f"{index:06d}{i:07d}" for i in range(rows)]
    table = pa.table({
        "uid": uids, "url": [f"http://127.0.0.1/{u}.jpg" for u in uids],
        "caption": [f"a pattern number {u}" for u in uids], "key": uids, "status": ["success"] * rows,
        "error_message": pa.array([None] * rows, pa.string()),
        "width": pa.array([SIDE] * rows, pa.int32()), "height": pa.array([SIDE] * rows, pa.int32()),
        "original_width": pa.array([SIDE] * rows, pa.int32()), "original_height": pa.array([SIDE] * rows, pa.int32()),
        "sha256": [hashlib.sha256(b).hexdigest() for b in images], "jpg": pa.array(images, pa.binary()),
    })
    pq.write_table(table, folder / f"part-{index:05d}.parquet")
    return rows


def downloaded(work: Path, n: int, shard_rows: int, client) -> Path:
    """A finished `download` stage folder of n generated rows, written by the cluster's workers."""
    folder = work / "download"
    shutil.rmtree(work, ignore_errors=True)
    folder.mkdir(parents=True)
    counts = [min(shard_rows, n - start) for start in range(0, n, shard_rows)]
    futures = client.map(write_shard, [folder] * len(counts), range(len(counts)), counts, pure=False)
    client.gather(futures)
    stats = {"stage": "download", "shards": len(counts), "rows_in": n, "rows_out": n, "rows_rejected": 0,
             "reasons": {}, "counters": {}, "seconds": 0.0, "config": {}}
    (folder / "_stats.json").write_text(json.dumps(stats))
    (folder / "_SUCCESS").write_text("")
    return folder


def run(work: Path, n: int, shard_rows: int, workers: int) -> dict:
    """Generate n rows, then clean them on a fresh cluster while sampling each worker's RSS."""
    config = ClusterConfig(workers=workers)
    with dask_client(config, quiet=True) as client:
        start = time.perf_counter()
        folder = downloaded(work, n, shard_rows, client)
        print(f"  {n} rows generated in {time.perf_counter() - start:.0f} s", flush=True)
    samples, stop = [], threading.Event()
    with dask_client(config, quiet=True) as client:
        client.run(lambda: __import__("dallekit.pipeline.clean") and __import__("dallekit.pipeline.dedup") and None)
        began = time.perf_counter()

        def poll() -> None:
            while not stop.wait(0.5):
                try:
                    per_worker = client.run(rss)
                except Exception:  # noqa: BLE001, S112 - a poll racing the cluster's shutdown: the next one counts
                    continue
                samples.append((time.perf_counter() - began, sorted(per_worker.values())))

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        stats = clean(str(folder), str(work / "clean"), CleanConfig(), client)
        seconds = time.perf_counter() - began
        stop.set()
        thread.join()
    peak = max(max(values) for _, values in samples)
    line = (f"size={n} seconds={seconds:.1f} rows/s={n / seconds:.0f} peak_worker_rss_mb={peak / 2**20:.0f} "
            f"rows_out={stats['rows_out']} reasons={stats['reasons']}")
    return {"n": n, "seconds": seconds, "peak": peak, "line": line, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,2000000", help="comma-separated row counts")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--work", default="/tmp/clean-scale")
    parser.add_argument("--png", default="docs/clean_scale_rss.png", help="the RSS timeline of the largest size")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.workers} workers, {args.shard_rows}-row shards", flush=True)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        results.append(run(Path(args.work), n, args.shard_rows, args.workers))
        print(results[-1]["line"], flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    last = results[-1]
    times = [round(t, 1) for t, _ in last["samples"]]
    series = {f"worker {i + 1} (sorted by RSS)": [values[i] / 2**20 for _, values in last["samples"]]
              for i in range(min(len(v) for _, v in last["samples"]))}
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    Path(args.png).write_bytes(line_chart(times, series, f"clean of {last['n']} rows: worker RSS", "seconds", "MB"))
    print(f"rss timeline: {args.png}")
    print(f"ratio={last['peak'] / results[0]['peak']:.2f}")  # peak worker RSS, largest size / smallest (target <= 1.3)


if __name__ == "__main__":
    main()
