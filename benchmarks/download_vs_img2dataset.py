"""dallekit download vs img2dataset's own CLI on the same loopback URL list.

Serves N generated JPEGs on 127.0.0.1, writes one URL list, runs `dallekit ingest` once (not
timed), then alternates img2dataset's CLI and `dallekit download` with the same processes,
threads, shard size, image size and resize mode. Prints images/s of each and, as its last
line, ratio=<dallekit images/s / img2dataset images/s> (best run of each).

    python benchmarks/download_vs_img2dataset.py [--n 5000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from dallekit.demo.synthetic import ShapesServer, make_dataset

BIN = Path(sys.executable).parent


def run(cmd: list[str]) -> float:
    """Run a command to completion and return its wall time."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return seconds


def successes(folder: Path) -> int:
    """Rows with status success in a folder of Parquet files."""
    files = [p for p in folder.glob("*.parquet") if not p.name.startswith("_")]
    return sum(pq.read_table(p, columns=["status"]).to_pandas()["status"].eq("success").sum() for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="images served")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool, alternating")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()

    data = make_dataset(args.n, seed=0, broken_fraction=0.0, png_fraction=0.0)
    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    common = dict(image_size=256, resize_mode="center_crop")
    times: dict[str, list[float]] = {"img2dataset": [], "dallekit": []}
    with ShapesServer(data.routes, max_seconds=3600) as server:
        urls = work / "urls.parquet"
        pd.DataFrame({"url": [server.url(r["path"]) for r in data.rows], "caption": [r["caption"] for r in data.rows]}).to_parquet(urls)
        run([str(BIN / "dallekit"), "ingest", str(urls), "--out", str(work / "shards"), "--shard-size", str(args.shard_size), "--workers", str(args.processes)])
        for repeat in range(args.repeats):
            out = work / f"i2d-{repeat}"
            t = run([
                str(BIN / "img2dataset"), f"--url_list={urls}", "--input_format=parquet", "--url_col=url", "--caption_col=caption",
                "--output_format=parquet", f"--output_folder={out}", f"--processes_count={args.processes}",
                f"--thread_count={args.threads}", f"--image_size={common['image_size']}", f"--resize_mode={common['resize_mode']}",
                f"--number_sample_per_shard={args.shard_size}", "--enable_wandb=False", "--distributor=multiprocessing",
            ])
            assert successes(out) == args.n, f"img2dataset got {successes(out)} of {args.n}"
            times["img2dataset"].append(t)
            out = work / f"dk-{repeat}"
            t = run([
                str(BIN / "dallekit"), "download", str(work / "shards"), "--out", str(out), "--workers", str(args.processes),
                "--threads", str(args.threads), "--image-size", str(common["image_size"]), "--resize-mode", common["resize_mode"],
            ])
            assert successes(out) == args.n, f"dallekit got {successes(out)} of {args.n}"
            times["dallekit"].append(t)
    shutil.rmtree(work, ignore_errors=True)
    rate = {k: args.n / min(v) for k, v in times.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.n} images, {args.processes} processes x {args.threads} threads, 256 px center_crop")
    print(f"{'tool':<14}{'best s':>10}{'all runs s':>28}{'images/s':>12}")
    for tool, runs in times.items():
        print(f"{tool:<14}{min(runs):>10.2f}{', '.join(f'{r:.2f}' for r in runs):>28}{rate[tool]:>12.1f}")
    print(f"ratio={rate['dallekit'] / rate['img2dataset']:.3f}")


if __name__ == "__main__":
    main()
