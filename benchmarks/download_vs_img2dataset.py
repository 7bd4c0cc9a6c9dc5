"""dallekit download vs img2dataset's own CLI on the same loopback URL list.

Serves N generated JPEGs on 127.0.0.1, writes one URL list, runs `dallekit ingest` once (not
timed), then alternates img2dataset's CLI and `dallekit download` in rounds (ABAB...) with the
same processes, threads, shard size, image size and resize mode. Prints images/s of both per
round and, as its last line, ratio=<median over rounds of dallekit images/s / img2dataset images/s>.

    python benchmarks/download_vs_img2dataset.py [--n 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from common import BIN, alternate, img2dataset_command, print_rounds, run_command, successes

from dallekit.demo.synthetic import ShapesServer, make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="images served")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of img2dataset then dallekit")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()

    data = make_dataset(args.n, seed=0, broken_fraction=0.0, png_fraction=0.0)
    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    with ShapesServer(data.routes, max_seconds=3600) as server:
        urls = work / "urls.parquet"
        pd.DataFrame({"url": [server.url(r["path"]) for r in data.rows], "caption": [r["caption"] for r in data.rows]}).to_parquet(urls)
        run_command([str(BIN / "dallekit"), "ingest", str(urls), "--out", str(work / "shards"), "--shard-size", str(args.shard_size),
                     "--workers", str(args.processes)])

        def rate(tool: str, cmd: list[str], out: Path) -> float:
            """images/s of one run of cmd, which writes into out (removed afterwards)."""
            seconds = run_command(cmd)
            assert successes(out) == args.n, f"{tool} got {successes(out)} of {args.n}"
            shutil.rmtree(out)
            return args.n / seconds

        def img2dataset() -> float:
            return rate("img2dataset", img2dataset_command(urls, work / "i2d", args.processes, args.threads, args.shard_size), work / "i2d")

        def dallekit() -> float:
            return rate("dallekit", [str(BIN / "dallekit"), "download", str(work / "shards"), "--out", str(work / "dk"), "--workers",
                                     str(args.processes), "--threads", str(args.threads), "--image-size", "256", "--resize-mode", "center_crop"],
                        work / "dk")

        results = alternate(args.rounds, img2dataset, dallekit)
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.n} images, {args.processes} processes x {args.threads} threads, 256 px center_crop")
    print_rounds(results, "img2dataset", "dallekit", "images/s")


if __name__ == "__main__":
    main()
