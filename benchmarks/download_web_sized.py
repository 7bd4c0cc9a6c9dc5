"""dallekit download vs img2dataset's CLI on web-sized photos: where the reduced-scale JPEG decode pays.

Serves N photo-like JPEGs (`dallekit.demo.synthetic.photo_like`: detail at every scale, quality
90) on 127.0.0.1: 40% at 640x480, 40% at 1280x960 and 20% at 2048x1536, each a distinct crop.
Writes one URL list, runs `dallekit ingest` once (not timed), then alternates img2dataset's CLI
and `dallekit download` in rounds (ABAB...) with the same processes, threads, shard size,
`--image-size 256` and `center_crop`. Prints images/s of both per round and, as its last line,
ratio=<median over rounds of dallekit images/s / img2dataset images/s>. Target >= 1.5.

    python benchmarks/download_web_sized.py [--n 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from common import BIN, alternate, img2dataset_command, print_rounds, run_command, successes  # noqa: E402

from dallekit.demo.synthetic import Route, ShapesServer, photo_like  # noqa: E402

SIZES = ((640, 480, 0.4), (1280, 960, 0.4), (2048, 1536, 0.2))  # (width, height, share of the images)
MARGIN = 64  # each image is a crop of a slightly larger photo at its own offset: distinct bytes


def photo_routes(n: int, seed: int = 0) -> dict[str, Route]:
    """n distinct photo-like JPEGs in the benchmark's size mix, as server routes."""
    rng = np.random.default_rng(seed)
    routes = {}
    for k, (width, height, share) in enumerate(SIZES):
        count = round(n * share) if k < len(SIZES) - 1 else n - len(routes)
        canvases = [photo_like(seed * 100 + k * 10 + c, (width + MARGIN, height + MARGIN)) for c in range(4)]
        for i in range(count):
            dx, dy = rng.integers(0, MARGIN, 2)
            buffer = io.BytesIO()
            canvases[i % len(canvases)].crop((dx, dy, dx + width, dy + height)).save(buffer, format="JPEG", quality=90)
            routes[f"/photo/{width}/{i}.jpg"] = Route(buffer.getvalue(), headers={"Content-Type": "image/jpeg"})
    return routes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="images served")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of img2dataset then dallekit")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args()

    routes = photo_routes(args.n)
    megabytes = sum(len(r.body) for r in routes.values()) / 2**20
    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    rounds = iter(range(10**6))
    with ShapesServer(routes, max_seconds=3600) as server:
        urls = work / "urls.parquet"
        pd.DataFrame({"url": [server.url(p) for p in routes], "caption": [f"a photograph number {i}" for i in range(len(routes))]}).to_parquet(urls)
        run_command([str(BIN / "dallekit"), "ingest", str(urls), "--out", str(work / "shards"), "--shard-size", str(args.shard_size), "--workers", str(args.processes)])

        def img2dataset() -> float:
            out = work / f"i2d-{next(rounds)}"
            seconds = run_command(img2dataset_command(urls, out, args.processes, args.threads, args.shard_size))
            assert successes(out) == args.n, f"img2dataset got {successes(out)} of {args.n}"
            shutil.rmtree(out)
            return args.n / seconds

        def dallekit() -> float:
            out = work / f"dk-{next(rounds)}"
            seconds = run_command([str(BIN / "dallekit"), "download", str(work / "shards"), "--out", str(out), "--workers", str(args.processes),
                           "--threads", str(args.threads), "--image-size", "256", "--resize-mode", "center_crop"])
            assert successes(out) == args.n, f"dallekit got {successes(out)} of {args.n}"
            shutil.rmtree(out)
            return args.n / seconds

        results = alternate(args.rounds, img2dataset, dallekit)
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.n} photo-like JPEGs ({megabytes:.0f} MiB: "
          f"40% 640x480, 40% 1280x960, 20% 2048x1536), {args.processes} processes x {args.threads} threads, 256 px center_crop")
    print_rounds(results, "img2dataset", "dallekit", "img/s")


if __name__ == "__main__":
    sys.exit(main())
