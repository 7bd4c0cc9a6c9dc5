"""clean's distributed dedup at 1M, 4M and 16M rows: rows/s and the largest worker's peak memory, vs today's one-task dedup.

Writes synthetic scan tables (no images): random 64-bit pHashes, random sha256 hex, random 8x8
thumbnails; 3% exact copies of other rows, 5% near-duplicate variants of a row a few places
before (1-4 bits, colours within 3; a tenth of them recoloured, which must not merge), 2%
rejected rows, and one cluster of 10,000 identical hashes and thumbnails spread over the shards.
Each size runs on a fresh LocalCluster of 2 worker processes (start-up not timed); the peak
RSS is the largest worker's ru_maxrss (and a 0.5 s poll of its RSS); sizes under 4M rows run three
times on one cluster and report the median time. Today's one-task dedup
(a copy, `old_dedup_dataset`) runs beside the new one at the smallest size, and both outputs
are compared. Last lines: the peak RSS ratio largest/smallest size (target <= 1.3), new vs old
(target >= 20x) and ratio=<rows/s at the largest size / rows/s at the smallest> (target >= 0.8).

    python benchmarks/dedup_scale.py [--sizes 1000000,4000000,16000000] [--work /tmp/dedup-scale]

Each measurement is kept in --results as it finishes; a rerun prints the kept ones and runs the rest.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import measure, measured

from dallekit.config import ClusterConfig
from dallekit.images import THUMB_BYTES, color_distance, thumbs_array
from dallekit.io import write_table_atomic
from dallekit.pipeline.cluster import dask_client
from dallekit.pipeline.dedup import dedup, dedup_stats
from dallekit.pipeline.passes import map_with_progress
from dallekit.pipeline.uids import check_unique_uids

_HEX = np.array([list(f"{i:02x}".encode()) for i in range(256)], np.uint8)
PLACEHOLDERS = 10_000


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of uint64): deterministic pseudo-random words per row."""
    x = np.asarray(x, np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def words(ids: np.ndarray, n: int, salt: int) -> np.ndarray:
    """(len(ids), n) pseudo-random uint64 words of each id."""
    return mix(ids[:, None] * np.uint64(n) + np.arange(n, dtype=np.uint64) + np.uint64(salt))


def hex_strings(data: np.ndarray) -> pa.Array:
    """Rows of uint8 as lower-case hex strings."""
    chars = _HEX[data].reshape(len(data), -1)
    return pa.array(chars.view(f"S{chars.shape[1]}").ravel(), pa.binary()).cast(pa.string())


def images(src: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sha256 words, pHash, thumbnail) of the pictures behind rows `src`: near variants of an earlier row, placeholders."""
    sha = words(src, 4, 1)
    roll = mix(src ^ np.uint64(0xA5A5)) % np.uint64(100)
    variant = (roll < np.uint64(5)) & (src >= np.uint64(4))
    base = np.where(variant, src - np.uint64(1) - mix(src) % np.uint64(3), src)
    ph = mix(base ^ np.uint64(0x5EED))
    thumb = words(base, THUMB_BYTES // 8, 3).view(np.uint8).reshape(len(src), THUMB_BYTES).copy()
    flips = words(src, 4, 5) % np.uint64(64)  # 1-4 bits of the base's hash
    count = (mix(src ^ np.uint64(77)) % np.uint64(4)).astype(int) + 1
    for i in range(4):
        on = variant & (count > i)
        ph[on] ^= np.uint64(1) << flips[on, i]
    noise = (words(src, THUMB_BYTES // 8, 7).view(np.uint8).reshape(len(src), THUMB_BYTES) % 7).astype(np.int16) - 3
    thumb[variant] = np.clip(thumb[variant].astype(np.int16) + noise[variant], 0, 255).astype(np.uint8)
    recolour = variant & (roll == np.uint64(0))
    thumb[recolour] ^= np.uint8(0x80)
    placeholder = src % np.uint64(max(1, n // PLACEHOLDERS)) == np.uint64(7)
    ph[placeholder] = np.uint64(0x0123456789ABCDEF)
    thumb[placeholder] = words(np.zeros(1, np.uint64), THUMB_BYTES // 8, 11).view(np.uint8)
    return sha, ph, thumb


def scan_shard(lo: int, hi: int, n: int) -> pa.Table:
    """Rows lo..hi of a synthetic dataset of n rows, as clean's scan writes them."""
    row = np.arange(lo, hi, dtype=np.uint64)
    copy = mix(row ^ np.uint64(0xC0FFEE)) % np.uint64(100) < np.uint64(3)
    src = np.where(copy, mix(row) % np.uint64(n), row)  # an exact copy shows another row's picture
    sha, ph, thumb = images(src, n)
    reason = np.where(mix(row ^ np.uint64(99)) % np.uint64(50) == np.uint64(0), "undecodable", None)
    return pa.table({
        "uid": hex_strings(mix(row ^ np.uint64(0xD1CE))[:, None].view(np.uint8)), "reason": pa.array(reason, pa.string()),
        "caption": pa.array(["a synthetic caption"] * len(row), pa.string()), "sha256": hex_strings(sha.view(np.uint8)),
        "phash": pa.array(ph, pa.uint64()),
        "color_thumb": pa.FixedSizeBinaryArray.from_buffers(pa.binary(THUMB_BYTES), len(row), [None, pa.py_buffer(thumb.tobytes())]),
    })


def write_dataset(work: Path, n: int, shard_rows: int) -> list[str]:
    """The scan tables of n rows, `shard_rows` per shard; returns the shard names."""
    names = []
    for i, lo in enumerate(range(0, n, shard_rows)):
        names.append(f"part-{i:05d}")
        pq.write_table(scan_shard(lo, min(n, lo + shard_rows), n), work / "scan" / f"{names[-1]}.parquet")
    return names


# ---------------------------------------------------------------- today's one-task dedup, copied as the baseline


class NearDuplicateIndex:
    """Kept 64-bit hashes, found again within `distance` bits by multi-index hashing, optionally confirmed by colour.

    Two hashes within d bits agree exactly on at least one of d+1 disjoint bit bands
    (pigeonhole), so only hashes sharing a band value are compared. pHash is grayscale: with
    `max_color` a match also needs colour thumbnails within that `color_distance`.
    """

    def __init__(self, distance: int, max_color: float | None = None):
        self.distance, self.max_color = distance, max_color
        n_bands = distance + 1
        edges = [round(i * 64 / n_bands) for i in range(n_bands + 1)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.bands]  # band value -> positions in kept
        self.kept: list[tuple[int, str, bytes | None]] = []  # (hash, uid, colour thumbnail)

    def find(self, value: int, thumb: bytes | None = None) -> tuple[str, int] | None:
        """(uid, distance) of the nearest kept hash within the distance whose colours agree, or None."""
        near: dict[int, int] = {}
        for (shift, mask), table in zip(self.bands, self.tables):
            for k in table.get((value >> shift) & mask, ()):
                if k not in near and (d := (value ^ self.kept[k][0]).bit_count()) <= self.distance:
                    near[k] = d
        order = sorted(near, key=lambda k: (near[k], k))  # nearest first, then the first kept
        if order and self.max_color is not None and thumb is not None:
            others = thumbs_array([self.kept[k][2] for k in order])
            agree = color_distance(others, thumbs_array([thumb])) <= self.max_color
            order = [k for k, ok in zip(order, agree) if ok]
        return (self.kept[order[0]][1], near[order[0]]) if order else None

    def add(self, value: int, uid: str, thumb: bytes | None = None) -> None:
        """Remember a kept hash (and its colour thumbnail)."""
        for (shift, mask), table in zip(self.bands, self.tables):
            table.setdefault((value >> shift) & mask, []).append(len(self.kept))
        self.kept.append((value, uid, thumb))


def _read_scans(shard_names: list[str], work_dir: str) -> pa.Table:
    """Every row's dedup columns from the scan tables, with its shard file, sorted by uid."""
    fs, root = fsspec.core.url_to_fs(work_dir)
    parts = []
    for name in shard_names:
        with fs.open(f"{root}/scan/{name}.parquet", "rb") as f:
            scan = pq.read_table(f, columns=["uid", "reason", "sha256", "phash", "color_thumb"])
        parts.append(scan.append_column("shard", pa.array([f"{name}.parquet"] * scan.num_rows, pa.string())))
    return pa.concat_tables(parts).sort_by("uid")


def old_dedup_dataset(shard_names: list[str], work_dir: str, distance: int, max_color: float = 6.0) -> dict:
    """Today's pass 2 (clean.dedup_dataset): one task reads every row and walks them in uid order."""
    rows = _read_scans(shard_names, work_dir)
    check_unique_uids(rows.column("uid"), rows.column("shard"))
    rows = rows.filter(pc.is_null(rows.column("reason")))
    first_by_sha: dict[str, str] = {}
    index = NearDuplicateIndex(distance, max_color) if distance >= 0 else None
    marks: dict[str, list] = {name: [] for name in shard_names}
    columns = (rows.column(c).to_pylist() for c in ("uid", "sha256", "phash", "color_thumb", "shard"))
    for uid, sha, hashed, thumb, shard in zip(*columns):
        found = marks[shard.removesuffix(".parquet")]
        if sha is not None and sha in first_by_sha:
            found.append((uid, "duplicate_image", first_by_sha[sha], 0))
            continue
        if sha is not None:
            first_by_sha[sha] = uid
        near = index.find(hashed, thumb) if index is not None else None
        if near is not None:
            found.append((uid, "near_duplicate_image", near[0], near[1]))
        elif index is not None:
            index.add(hashed, uid, thumb)
    for name, found in marks.items():
        uids, reasons, of, dist = zip(*found) if found else ([], [], [], [])
        table = pa.table({"uid": pa.array(uids, pa.string()), "reason": pa.array(reasons, pa.string()),
                          "duplicate_of": pa.array(of, pa.string()), "duplicate_distance": pa.array(dist, pa.int32())})
        write_table_atomic(table, f"{work_dir}/dups/{name}.parquet")
    return {name: len(found) for name, found in marks.items()}


# ---------------------------------------------------------------- measuring


def warm(client) -> None:
    """Import the dedup's libraries on every worker (a long-running worker has): not per-row work."""
    client.run(lambda: __import__("dallekit.pipeline.dedup") and __import__("pandas") and None)


def generated(work: Path, n: int, shard_rows: int) -> list[str]:
    """A fresh folder `work` with the scan tables of n rows."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "scan").mkdir(parents=True)
    start = time.perf_counter()
    names = write_dataset(work, n, shard_rows)
    print(f"  {n} rows generated in {time.perf_counter() - start:.0f} s ({len(names)} shards)", flush=True)
    return names


def run_new(work: Path, n: int, shard_rows: int, workers: int, repeats: int) -> dict:
    """The new dedup over n generated rows on a fresh cluster, `repeats` times: median seconds, the largest worker's peak RSS, its stats."""
    names = generated(work, n, shard_rows)
    times, peaks = [], []
    with dask_client(ClusterConfig(workers=workers), quiet=True) as client:
        warm(client)
        for _ in range(repeats):  # a short run is repeated: one busy minute of the shared machine moves it most
            shutil.rmtree(work / "dedup", ignore_errors=True)
            shutil.rmtree(work / "dups", ignore_errors=True)
            seconds, rss = measured(lambda: dedup(client, names, str(work), 4, 6.0), client)
            times.append(seconds)
            peaks.append(rss)
        s = dedup_stats(str(work))
    seconds, rss = float(np.median(times)), max(peaks)
    lines = [(f"size={n} seconds={seconds:.1f} rows/s={n / seconds:.0f} peak_worker_rss_mb={rss / 2**20:.0f} "
              f"runs={len(times)} seconds_each={[round(t, 1) for t in times]} "
              f"reps={s['representatives']} k={s['blocks']} tables={s['tables']} compared_pairs={s['compared_pairs']} "
              f"edges={s['edges']} cc_rounds={s['components_rounds']} marks={s['marks']}"),
             f"  pass seconds (wall, task sum): {s['pass_seconds']}"]
    return {"n": n, "seconds": seconds, "rss": rss, "lines": lines}


def run_old(work: Path, n: int, shard_rows: int, workers: int) -> dict:
    """Today's one-task dedup over n generated rows on a fresh cluster, its output compared with the new one's."""
    names = generated(work / "old", n, shard_rows)
    ref = generated(work / "new", n, shard_rows)
    with dask_client(ClusterConfig(workers=workers), quiet=True) as client:
        warm(client)
        dedup(client, ref, str(work / "new"), 4, 6.0)
        def job() -> None:
            map_with_progress(client, old_dedup_dataset, [names], desc="old dedup", work_dir=str(work / "old"), distance=4, max_color=6.0)

        seconds, rss = measured(job, client)
    same = all(pq.read_table(work / "new" / "dups" / f"{m}.parquet").equals(pq.read_table(work / "old" / "dups" / f"{m}.parquet"))
               for m in names)
    lines = [(f"old size={n} seconds={seconds:.1f} rows/s={n / seconds:.0f} peak_worker_rss_mb={rss / 2**20:.0f} "
              f"identical_output={same}")]
    return {"n": n, "seconds": seconds, "rss": rss, "lines": lines}


def main() -> None:
    """Run every size with the new dedup, then the old one at the smallest, and print the comparison lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,4000000,16000000", help="comma-separated row counts; the first also runs the old dedup")
    parser.add_argument("--work", default="/tmp/dedup-scale", help="scratch folder (16M rows need about 20 GB)")
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each size under 4M rows (the median is reported)")
    parser.add_argument("--no-old", action="store_true", help="skip today's one-task dedup")
    parser.add_argument("--results", default="/tmp/dedup-scale-results.json", help="measurements so far (delete it to measure afresh)")
    args = parser.parse_args()
    sizes, work, path = [int(s) for s in args.sizes.split(",")], Path(args.work), Path(args.results)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.workers} workers, {args.shard_rows}-row shards", flush=True)
    results = [measure(path, f"new-{n}", lambda n=n: run_new(work, n, args.shard_rows, args.workers, args.repeats if n < 4_000_000 else 1))
               for n in sizes]
    old = None if args.no_old else measure(path, f"old-{sizes[0]}", lambda: run_old(work, sizes[0], args.shard_rows, args.workers))
    shutil.rmtree(work, ignore_errors=True)
    first, last = results[0], results[-1]
    print(f"peak_rss_ratio {last['n']}/{first['n']}={last['rss'] / first['rss']:.2f} (target <= 1.3)")
    if old:
        print(f"new_vs_old at {first['n']}={old['seconds'] / first['seconds']:.1f}x (target >= 20x)")
    print(f"ratio={(last['n'] / last['seconds']) / (first['n'] / first['seconds']):.2f}")


if __name__ == "__main__":
    main()
