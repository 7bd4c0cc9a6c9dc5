"""Ingest's URL dedup at 4M rows: the passes on the engine (`pipeline/url_dedup.py`) vs today's, copied here as `old_*`.

Writes synthetic normalised blocks as ingest's scan makes them (uid, url, caption, _reason,
_order; Arrow files that the tasks memory-map, as a scan has its block in memory): about 10% of the rows repeat an earlier row's URL, 2% are rejects
that take no part. Both sides then do the URL dedup from those blocks to one file of repeats
per block (`block_dups/b-N.parquet`, what a shard task reads): each block's valid URLs bucketed
by a hash of the URL (old: a BLAKE2b per row and one Parquet file per block and bucket; new:
a vectorised hash and one file per block, an Arrow stream per bucket), one task per bucket
finding the repeats (old: pandas; new: a sort by that hash, each repeat's URL compared with its
first's), and one task per block gathering its repeats. Parsing and normalising the input (the same code on both sides) is not timed.

Both run on one LocalCluster of 2 worker processes, alternating (old, new) in rounds; each
round's repeats are compared (the same (_order, duplicate_of) per block, so the same kept rows
and rejects). Each side has its own bucket count, from the input's bytes as a TSV: today's 512
MiB a bucket, ingest's BUCKET_BYTES now; --buckets gives both the same.
Last line: ratio=<median of old seconds / new seconds>.

    python benchmarks/url_dedup_scale.py [--rows 4000000] [--rounds 3] [--buckets N] [--work /tmp/url-dedup-scale]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import shutil
import time
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import alternate, print_rounds

from dallekit.config import ClusterConfig
from dallekit.io import write_table_atomic
from dallekit.pipeline.cluster import dask_client
from dallekit.pipeline.ingest import BUCKET_BYTES, ROW_GROUP
from dallekit.pipeline.passes import map_with_progress, run_pass, work_dir
from dallekit.pipeline.url_dedup import DUPS, block_dups_path, find_repeats, write_url_parts

OLD_BUCKET_BYTES = 512 * 2**20  # today's input bytes per bucket
COLUMNS = ["uid", "url", "_reason", "_order"]  # what the URL part of a scan uses
_HEX = np.array([list(f"{i:02x}".encode()) for i in range(256)], np.uint8)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: deterministic pseudo-random words per row."""
    x = np.asarray(x, np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hex_strings(words: np.ndarray) -> pa.Array:
    """Each uint64 as 16 lower-case hex digits."""
    chars = _HEX[words[:, None].view(np.uint8)].reshape(len(words), -1)
    return pa.array(chars.view("S16").ravel(), pa.binary()).cast(pa.string())


def synthetic_block(block: int, lo: int, hi: int) -> pa.Table:
    """Rows lo..hi of the synthetic input, as ingest's scan normalises a block."""
    row = np.arange(lo, hi, dtype=np.uint64)
    repeat = mix(row ^ np.uint64(0xC0FFEE)) % np.uint64(10) == np.uint64(0)  # 10%: an earlier row's URL
    source = np.where(repeat, mix(row) % np.maximum(row, np.uint64(1)), row)
    key = hex_strings(mix(source ^ np.uint64(0x5EED)))
    host = pc.binary_join_element_wise("https://cdn", pa.array((source % np.uint64(97)).astype(str)), ".example.com/photos/", "")
    url = pc.binary_join_element_wise(host, key, "/large/image.jpg?w=800", "")
    reason = np.where(mix(row ^ np.uint64(99)) % np.uint64(50) == np.uint64(0), "empty_caption", None)
    return pa.table({
        "uid": hex_strings(mix(row ^ np.uint64(0xD1CE))), "url": url,
        "caption": pc.binary_join_element_wise("a synthetic caption number ", pa.array(row.astype(str)), ""),
        "_reason": pa.array(reason, pa.string()),
        "_order": pa.array((np.int64(block) << 32) + np.arange(hi - lo, dtype=np.int64)),
    })


def write_blocks(folder: Path, rows: int, block_rows: int) -> tuple[list[str], int]:
    """The normalised blocks of `rows` rows; their paths and the bytes of the same rows as a TSV (what sizes ingest's buckets)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, text_bytes = [], 0
    for block, lo in enumerate(range(0, rows, block_rows)):
        table = synthetic_block(block, lo, min(rows, lo + block_rows))
        text_bytes += sum(pc.sum(pc.binary_length(table.column(c))).as_py() + table.num_rows for c in ("url", "caption"))
        paths.append(str(folder / f"b-{block:06d}.arrow"))
        with pa.ipc.new_file(paths[-1], table.schema) as writer:  # memory-mapped by the tasks: as a scan has its block in memory
            writer.write_table(table)
    return paths, text_bytes


def read_block(path: str) -> pa.Table:
    """A normalised block's columns the URL dedup uses, memory-mapped (no decoding: ingest's scan has them in memory)."""
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all().select(COLUMNS)


# ---------------------------------------------------------------- today's URL dedup (main's ingest.py), copied as the peer


def old_url_buckets(urls: pa.Array, n_buckets: int) -> np.ndarray:
    """The dedup bucket of each URL: a hash of the URL alone, so repeats meet in one bucket."""
    digests = [hashlib.blake2b(u.encode(), digest_size=8).digest() for u in urls.to_pylist()]
    return np.array([int.from_bytes(d, "little") % n_buckets for d in digests], dtype=np.int64)


def old_scan_urls(path: str, work_dir: str, n_buckets: int) -> int:
    """The URL part of today's scan_block: the block's valid URLs into one file per bucket."""
    table = read_block(path)
    index = int(path.rsplit("-", 1)[-1].removesuffix(".arrow"))
    valid = table.filter(pc.is_null(table.column("_reason"))).select(["url", "uid", "_order"])
    buckets = old_url_buckets(valid.column("url"), n_buckets) if valid.num_rows else np.zeros(0, np.int64)
    for k in range(n_buckets):
        part = valid.filter(pa.array(buckets == k))
        if part.num_rows:
            write_table_atomic(part, f"{work_dir}/urls/h-{k:04d}/b-{index:06d}.parquet")
    return table.num_rows


def old_dedup_bucket(bucket: int, work_dir: str) -> int:
    """Pass 2: in one URL bucket, mark every repeat of a URL after its first occurrence; returns the count."""
    fs, root = fsspec.core.url_to_fs(f"{work_dir}/urls/h-{bucket:04d}")
    paths = sorted(fs.glob(f"{root}/b-*.parquet"))
    if not paths:
        return 0
    table = pa.concat_tables([pq.read_table(fs.open(p, "rb")) for p in paths])
    df = table.to_pandas().sort_values("_order", kind="stable")
    repeated = df.duplicated("url", keep="first")
    firsts = df[~repeated].set_index("url")["uid"]
    dups = df[repeated]
    result = pd.DataFrame({"_order": dups["_order"].to_numpy(), "duplicate_of": dups["url"].map(firsts).to_numpy()})
    write_table_atomic(pa.Table.from_pandas(result, preserve_index=False), f"{work_dir}/dups/h-{bucket:04d}.parquet",
                       row_group_size=ROW_GROUP)
    return len(result)


def old_regroup_dups(block: int, work_dir: str) -> int:
    """Pass 2b: the repeats of one block from every bucket, to `block_dups/b-N.parquet`."""
    fs, root = fsspec.core.url_to_fs(f"{work_dir}/dups")
    lo, hi = block << 32, (block + 1) << 32
    parts = [pq.read_table(fs.open(p, "rb"), filters=[("_order", ">=", lo), ("_order", "<", hi)])
             for p in sorted(fs.glob(f"{root}/h-*.parquet"))]
    table = pa.concat_tables(parts, promote_options="permissive").sort_by("_order") if parts else pa.table(
        {"_order": pa.array([], pa.int64()), "duplicate_of": pa.array([], pa.string())})
    write_table_atomic(table, f"{work_dir}/block_dups/b-{block:06d}.parquet")
    return table.num_rows


def old_passes(client, blocks: list[str], output_dir: str, n_buckets: int) -> None:
    """Today's prepare, less the block normalising: map_with_progress per pass, one file per block and bucket."""
    scratch = work_dir(output_dir)
    map_with_progress(client, old_scan_urls, blocks, desc="old scan", unit="block", work_dir=scratch, n_buckets=n_buckets)
    map_with_progress(client, old_dedup_bucket, list(range(n_buckets)), desc="old dedup", unit="bucket", work_dir=scratch)
    map_with_progress(client, old_regroup_dups, list(range(len(blocks))), desc="old regroup", unit="block", work_dir=scratch)


# ---------------------------------------------------------------- the passes on the engine


def new_scan_urls(path: str, work_dir: str, n_buckets: int) -> dict:
    """The URL part of ingest's scan_block now: the block's valid URLs, one file of a stream per bucket."""
    table = read_block(path)
    name = path.rsplit("/", 1)[-1].removesuffix(".arrow")
    parts = write_url_parts(table, n_buckets, work_dir, name, keep=pc.is_null(table.column("_reason")))
    return {"rows": table.num_rows, "parts": {"urls": parts}}


def new_passes(client, blocks: list[str], output_dir: str, n_buckets: int) -> None:
    """ingest's prepare now, less the block normalising: resumable passes, one file per producer."""
    scratch = work_dir(output_dir)
    items = {p.rsplit("/", 1)[-1].removesuffix(".arrow"): p for p in blocks}
    scanned = run_pass(client, scratch, "scan", new_scan_urls, items, desc="new scan", unit="block", work_dir=scratch, n_buckets=n_buckets)
    find_repeats(client, output_dir, list(scanned.values()), n_buckets, [[b] for b in range(len(blocks))], "new")


# ---------------------------------------------------------------- measuring


def repeats_of(output_dir: str, blocks: int) -> list[pa.Table]:
    """Each block's repeats as the shards read them."""
    return [pq.read_table(block_dups_path(work_dir(output_dir), b)).select(DUPS.names).cast(DUPS) for b in range(blocks)]


def main() -> None:
    """Generate the blocks, run old and new in alternating rounds, compare their repeats, print the rounds and ratio= last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--block-rows", type=int, default=500_000, help="rows per scan block (ingest's 64 MiB of text is ~500k-800k rows)")
    parser.add_argument("--buckets", type=int, default=0, help="URL buckets (default: ingest's, from the input's bytes)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default="/tmp/url-dedup-scale")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    blocks, text_bytes = write_blocks(work / "blocks", args.rows, args.block_rows)
    old_buckets = args.buckets or max(1, math.ceil(text_bytes / OLD_BUCKET_BYTES))
    new_buckets = args.buckets or max(1, math.ceil(text_bytes / BUCKET_BYTES))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.workers} workers; {args.rows} rows in {len(blocks)} blocks "
          f"({text_bytes / 2**20:.0f} MiB as text; buckets: old {old_buckets}, new {new_buckets}), generated in {time.perf_counter() - start:.0f} s", flush=True)
    same = []
    with dask_client(ClusterConfig(workers=args.workers), quiet=True) as client:
        client.run(lambda: __import__("dallekit.pipeline.url_dedup") and __import__("pandas") and None)

        def timed(passes, side: str, n_buckets: int):
            def run() -> float:
                out = str(work / side)
                shutil.rmtree(out, ignore_errors=True)
                began = time.perf_counter()
                passes(client, blocks, out, n_buckets)
                return args.rows / (time.perf_counter() - began)
            return run

        def compared(run):
            def check() -> float:
                rate = run()
                same.append(all(a.equals(b) for a, b in zip(repeats_of(str(work / "old"), len(blocks)), repeats_of(str(work / "new"), len(blocks)))))
                return rate
            return check

        results = alternate(args.rounds, timed(old_passes, "old", old_buckets), compared(timed(new_passes, "new", new_buckets)))
    found = sum(t.num_rows for t in repeats_of(str(work / "new"), len(blocks)))
    shutil.rmtree(work, ignore_errors=True)
    print(f"same repeats (_order, duplicate_of) per block in every round: {all(same)} ({found} repeats of {args.rows} rows)")
    print_rounds(results, "old", "new", "rows/s")


if __name__ == "__main__":
    main()
