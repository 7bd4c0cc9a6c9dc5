"""Semantic dedup at 1M and 4M rows: rows/s and the largest worker's peak memory, and the drops checked against brute force.

Writes a synthetic embeddings folder (`dallekit embed`'s format, 512-d float16): rows around
N / 1,000 topic centres (cosine ~0.5 to their centre), and 5% planted near-copies of a row 1-3
places before (cosine ~0.97-0.999 to it). Each size runs the semantic dedup core (every row
eligible, eps 0.05, auto k) on a fresh LocalCluster of 2 worker processes (start-up not timed);
the peak RSS is the largest worker's VmHWM (and a 0.5 s poll of its RSS). The check: whole
clusters picked at random up to 20,000 rows, the rule computed over them in numpy (every pair,
float64), compared with the run's duplicate_of for every row of them. Last lines: the peak RSS
ratio largest/smallest size (target <= 1.3) and ratio=<rows/s at the largest size / rows/s at
the smallest> (target >= 0.8).

    python benchmarks/semantic_dedup_scale.py [--sizes 1000000,4000000] [--work /tmp/semdedup-scale]

Each measurement is kept in --results as it finishes; a rerun prints the kept ones and runs the rest.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import measure, measured

from dallekit.config import ClusterConfig
from dallekit.pipeline.cluster import dask_client
from dallekit.pipeline.embeddings import embedding_array, embedding_matrix, embedding_metadata
from dallekit.pipeline.semdedup import SemanticParams, semantic_dedup, semantic_path

DIM = 512
ROWS_PER_TOPIC = 1_000
CHECK_ROWS = 20_000
IDENTITY = {"model": "synthetic", "pretrained": None, "checkpoint": None}


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def shard_vectors(n: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) vectors of rows lo..hi of an n-row dataset: topic members and planted near-copies, deterministic per shard."""
    topics = max(1, n // ROWS_PER_TOPIC)
    centres = unit(np.random.default_rng(0).standard_normal((topics, DIM), np.float32))
    rng = np.random.default_rng(lo + 1)
    topic = rng.integers(0, topics, hi - lo)
    image = unit(centres[topic] + 0.075 * rng.standard_normal((hi - lo, DIM), np.float32))
    copies = np.flatnonzero((rng.random(hi - lo) < 0.05) & (np.arange(hi - lo) >= 3))
    for i in copies:  # in order, so a copy of a copy is a chain
        image[i] = unit(image[i - 1 - rng.integers(0, 3)][None] + rng.uniform(0.002, 0.01) * rng.standard_normal((1, DIM), np.float32))[0]
    text = unit(image + 0.07 * rng.standard_normal((hi - lo, DIM), np.float32))
    return image, text


def write_dataset(folder: Path, n: int, shard_rows: int) -> list[tuple[str, str]]:
    """The embeddings folder of n rows, one shard at a time; its [(name, path)]."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shards, start = [], time.perf_counter()
    for i, lo in enumerate(range(0, n, shard_rows)):
        hi = min(n, lo + shard_rows)
        image, text = shard_vectors(n, lo, hi)
        table = pa.table({"uid": pa.array([f"{r:012x}" for r in range(lo, hi)]), "image_embedding": embedding_array(image),
                          "text_embedding": embedding_array(text)}).replace_schema_metadata(embedding_metadata(IDENTITY, DIM))
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(table, path, compression="none", use_dictionary=False)  # float16 lists read 5x faster plain
        shards.append((path.stem, str(path)))
    print(f"  {n} rows generated in {time.perf_counter() - start:.0f} s ({len(shards)} shards)", flush=True)
    return shards


def brute_force_check(shards: list[tuple[str, str]], scratch: str, eps: float, seed: int = 0) -> str:
    """Whole clusters up to CHECK_ROWS rows, the rule over them in numpy, compared with the run's output; one line."""
    out = pa.concat_tables([pq.read_table(semantic_path(scratch, name)) for name, _ in shards])
    sizes = np.bincount(out["semantic_cluster"].to_numpy())
    chosen, held = [], 0
    for c in np.random.default_rng(seed).permutation(len(sizes)).tolist():
        if 0 < sizes[c] and held + sizes[c] <= CHECK_ROWS:
            chosen.append(c)
            held += int(sizes[c])
    mine = out.filter(pc.is_in(out["semantic_cluster"], pa.array(chosen, pa.int32())))
    vectors = []
    for _, path in shards:
        table = pq.read_table(path, columns=["uid", "image_embedding"])
        table = table.filter(pc.is_in(table["uid"], mine["uid"]))
        vectors.append((table["uid"].to_pylist(), embedding_matrix(table["image_embedding"]).astype(np.float64)))
    by_uid = {u: v for uids, x in vectors for u, v in zip(uids, x)}
    rows = mine.to_pylist()
    wrong, dups = 0, 0
    for c in chosen:
        members = sorted((r for r in rows if r["semantic_cluster"] == c), key=lambda r: (-r["centroid_similarity"], r["uid"]))
        x = np.stack([by_uid[r["uid"]] for r in members])
        sims = x @ x.T
        for p, row in enumerate(members):
            earlier = np.flatnonzero(sims[p, :p] > 1 - eps)
            expected = members[earlier[0]]["uid"] if len(earlier) else None
            dups += expected is not None
            wrong += expected != row["duplicate_of"]
    return f"  brute force over {len(chosen)} clusters, {held} rows: {dups} duplicates, {wrong} rows differ"


def run_size(work: Path, n: int, shard_rows: int, workers: int, eps: float) -> dict:
    """The semantic dedup over n generated rows on a fresh cluster: seconds, the largest worker's peak RSS, its stats, the check."""
    shards = write_dataset(work / "embeddings", n, shard_rows)
    scratch = str(work / "scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    params = SemanticParams(eps=eps)
    with dask_client(ClusterConfig(workers=workers), quiet=True) as client:
        client.run(lambda: __import__("faiss") and __import__("dallekit.pipeline.semdedup") and None)
        holder = {}
        seconds, rss = measured(lambda: holder.update(semantic_dedup(client, shards, scratch, params)), client)
    s = holder
    lines = [(f"size={n} seconds={seconds:.1f} rows/s={n / seconds:.0f} peak_worker_rss_mb={rss / 2**20:.0f} "
              f"k={s['clusters']} coarse={s['coarse_clusters']} largest_cluster={s['largest_cluster']} pairs_tasks={s['pairs_tasks']} "
              f"split_clusters={s['split_clusters']} compared_pairs={s['compared_pairs']} duplicates={s['duplicates']}"),
             f"  pass seconds (wall, task sum): {s['pass_seconds']}",
             brute_force_check(shards, scratch, eps)]
    shutil.rmtree(work, ignore_errors=True)
    return {"n": n, "seconds": seconds, "rss": rss, "lines": lines}


def main() -> None:
    """Every size in turn, then the scaling lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="1000000,4000000", help="comma-separated row counts")
    parser.add_argument("--work", default="/tmp/semdedup-scale", help="scratch folder (4M rows need about 14 GB)")
    parser.add_argument("--shard-rows", type=int, default=100_000, help="rows per embeddings shard")
    parser.add_argument("--workers", type=int, default=2, help="local Dask worker processes")
    parser.add_argument("--eps", type=float, default=0.05, help="duplicates have cosine > 1 - eps")
    parser.add_argument("--results", default="/tmp/semdedup-scale-results.json", help="measurements so far (delete it to measure afresh)")
    args = parser.parse_args()
    sizes, work, path = [int(s) for s in args.sizes.split(",")], Path(args.work), Path(args.results)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.workers} workers, {args.shard_rows}-row shards", flush=True)
    results = [measure(path, f"{n}", lambda n=n: run_size(work, n, args.shard_rows, args.workers, args.eps)) for n in sizes]
    first, last = results[0], results[-1]
    print(f"per_row_cpu_us at {last['n']}={args.workers * last['seconds'] / last['n'] * 1e6:.1f} (wall x workers / rows)")
    print(f"peak_rss_ratio {last['n']}/{first['n']}={last['rss'] / first['rss']:.2f} (target <= 1.3)")
    print(f"ratio={(last['n'] / last['seconds']) / (first['n'] / first['seconds']):.2f}")


if __name__ == "__main__":
    main()
