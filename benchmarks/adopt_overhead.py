"""adopt vs the least any adopt must do: pyarrow reading every img2dataset shard and writing it to a new folder.

img2dataset's own CLI downloads N photo-like JPEGs from a loopback server into its parquet
output format (LAION-style columns, sha256 kept as img2dataset computes it). The folder is then
tiled `--copies` times (each copy's shards renumbered, its URLs given `?copy=K` and its keys the
new shard number, so every row is distinct): a run's fixed costs (its Dask rounds) then weigh
as they do on a real folder of many shards, and downloading stays a few minutes. Then, in
rounds ABAB (A: pyarrow, B: dallekit), each on warm files:
  pyarrow:  `pq.read_table` of every shard and `pq.write_table` of it into a fresh folder (pyarrow's
            defaults), the floor of any tool that turns the folder into another one;
  dallekit: `adopt` into a fresh folder on a LocalCluster already started (2 worker processes):
            the repeated-URL passes, uids, each image's header check, key order, and the
            download-layout shards written a slice at a time, atomically, with their rejects,
            marks and `_stats.json`.
Both write into a fresh folder each round, removed after it.
Prints rows/s of both per round and, as its last line, ratio=<median over rounds of dallekit
rows/s / pyarrow rows/s>. Target >= 0.7.

    python benchmarks/adopt_overhead.py [--n 6000] [--shard-rows 1000] [--copies 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from dallekit.config import AdoptConfig, ClusterConfig
from dallekit.demo.synthetic import Route, ShapesServer
from dallekit.pipeline.adopt import adopt
from dallekit.pipeline.cluster import dask_client


def photo_like(seed: int, size=(512, 384)) -> bytes:
    """A smooth random field plus grain: compresses like a photograph (about 20 KB at 256 px), unlike flat shapes."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(small, dtype=np.int16) + rng.normal(0, 10, (size[1], size[0], 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def img2dataset_parquet(work: Path, n: int, shard_rows: int) -> Path:
    """img2dataset's CLI output (--output_format parquet) for n loopback URLs."""
    routes = {f"/img/{i}.jpg": Route(photo_like(i % 500), headers={"Content-Type": "image/jpeg"}) for i in range(n)}
    with ShapesServer(routes, max_seconds=3600) as server:
        pd.DataFrame({"URL": [server.url(p) for p in routes], "TEXT": [f"a photograph number {i}" for i in range(n)],
                      "similarity": np.linspace(0.2, 0.4, n)}).to_parquet(work / "laion.parquet")
        command = [str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(work / "laion.parquet"), "--input_format", "parquet",
                   "--url_col", "URL", "--caption_col", "TEXT", "--save_additional_columns", '["similarity"]', "--output_format", "parquet",
                   "--output_folder", str(work / "img2dataset"), "--processes_count", "2", "--thread_count", "16", "--image_size", "256",
                   "--number_sample_per_shard", str(shard_rows), "--enable_wandb", "False", "--distributor", "multiprocessing"]
        subprocess.run(command, check=True, capture_output=True, env=os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"})
    return work / "img2dataset"


def tiled(folder: Path, copies: int) -> Path:
    """The img2dataset folder repeated `copies` times as distinct rows: shards renumbered, URLs and keys made unique."""
    out = folder.parent / "tiled"
    out.mkdir()
    shards = sorted(folder.glob("*.parquet"))
    for k in range(copies):
        for i, path in enumerate(shards):
            number = k * len(shards) + i
            table = pq.read_table(path)
            url = pc.binary_join_element_wise(table.column("url"), f"?copy={k}", "")
            key = pc.binary_join_element_wise(f"{number:05d}", pc.utf8_slice_codeunits(table.column("key"), 5), "")
            table = table.set_column(table.column_names.index("url"), "url", url).set_column(table.column_names.index("key"), "key", key)
            pq.write_table(table, out / f"{number:05d}.parquet", row_group_size=100)  # img2dataset writes groups of 100 rows
    return out


def read_with_pyarrow(folder: Path) -> int:
    """Read every shard (to warm the page cache)."""
    return sum(pq.read_table(p).num_rows for p in sorted(folder.glob("*.parquet")))


def copy_with_pyarrow(folder: Path, out: Path) -> int:
    """The peer: read every shard and write it to a fresh folder, nothing else."""
    out.mkdir()
    rows = 0
    for p in sorted(folder.glob("*.parquet")):
        table = pq.read_table(p)
        pq.write_table(table, out / p.name)
        rows += table.num_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--shard-rows", type=int, default=1000)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    source = tiled(img2dataset_parquet(work, args.n, args.shard_rows), args.copies)
    size = sum(p.stat().st_size for p in source.glob("*.parquet"))
    read_with_pyarrow(source)  # warm the page cache for both
    ratios = []
    with dask_client(ClusterConfig(workers=2), quiet=True) as client:
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.n} rows from img2dataset x {args.copies} copies, "
              f"{size / 2**20:.0f} MiB in {len(list(source.glob('*.parquet')))} shards")
        print(f"{'round':<7}{'pyarrow rows/s':>16}{'dallekit rows/s':>17}{'ratio':>8}")
        for r in range(args.rounds):
            copied = work / f"copied-{r}"
            start = time.perf_counter()
            rows = copy_with_pyarrow(source, copied)
            peer = rows / (time.perf_counter() - start)
            shutil.rmtree(copied)
            out = work / f"adopted-{r}"
            start = time.perf_counter()
            stats = adopt(str(source), str(out), AdoptConfig(), client)
            ours = stats["rows_in"] / (time.perf_counter() - start)
            assert stats["rows_in"] == rows == stats["rows_out"] + stats["rows_rejected"], stats
            shutil.rmtree(out)
            ratios.append(ours / peer)
            print(f"{r + 1:<7}{peer:>16.0f}{ours:>17.0f}{ours / peer:>8.3f}")
    shutil.rmtree(work, ignore_errors=True)
    print(f"ratio={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
