"""Pass 3 of the semantic dedup, assign (one task per shard): each eligible row's cluster, its cosine to it, and its keep score.

The nearest coarse centroid, then the nearest of its fine ones (`kmeans.nearest`): about
2 sqrt(k) dot products per row, float32 matmuls of the float16 vectors. The task writes:

- `assigned/<shard>.parquet`: uid, semantic_cluster, centroid_similarity and the keep score
  (the centroid cosine, or image . text for `clip_score`), for the final pass;
- `rows/<shard>.arrow`: one shuffle file, a stream per consumer group of clusters (the kmeans
  task's packing), with each row's uid, id (shard << 32 | row), cluster, score and float16
  image embedding, for the pairs tasks;

and returns the rows per cluster (the driver sums them into k counts to plan the pairs tasks).
"""

from __future__ import annotations

import functools

import fsspec
import numpy as np
import pyarrow as pa

from dallekit.io import write_table_atomic
from dallekit.pipeline.dedup.columns import INTERMEDIATE_PARQUET
from dallekit.pipeline.embeddings import IMAGE_COLUMN, clip_score
from dallekit.pipeline.passes import ShuffleWriter
from dallekit.pipeline.semdedup.columns import read_vectors
from dallekit.pipeline.semdedup.eligible import eligible_rows
from dallekit.pipeline.semdedup.kmeans import centroids_path, load_centroids, nearest


def assigned_path(state_dir: str, name: str) -> str:
    """Where the assign pass writes one shard's clusters."""
    return f"{state_dir}/assigned/{name}.parquet"


@functools.lru_cache(maxsize=1)
def _centroids(state_dir: str, size: int, modified: float) -> dict[str, np.ndarray]:
    """The centroids, read once per worker process for as long as the file is the same one."""
    return load_centroids(state_dir)


def cached_centroids(state_dir: str) -> dict[str, np.ndarray]:
    """The kmeans task's arrays, cached per worker process by the file's size and time."""
    fs, p = fsspec.core.url_to_fs(centroids_path(state_dir))
    info = fs.info(p)
    return _centroids(state_dir, info["size"], float(info.get("mtime") or 0))


def assign_task(item: tuple[int, str, str], state_dir: str, filtered: bool, keep: str) -> dict:
    """Pass assign: one shard's eligible rows to their clusters; the assigned file, the shuffle to the pairs groups, rows per cluster."""
    s, name, path = item
    rows = eligible_rows(state_dir, name, filtered)
    table, image, text = read_vectors(path, rows, text=keep == "clip_score")
    found = cached_centroids(state_dir)
    cluster, cosine = nearest(image, found["coarse"], found["fine"], found["offsets"])
    score = cosine if keep == "centroid" else clip_score(image, text)
    write_table_atomic(pa.table({"uid": table.column("uid"), "semantic_cluster": pa.array(cluster, pa.int32()),
                                 "centroid_similarity": pa.array(cosine, pa.float32()), "score": pa.array(score, pa.float32())}),
                       assigned_path(state_dir, name), **INTERMEDIATE_PARQUET)
    positions = np.arange(table.num_rows, dtype=np.int64) if rows is None else rows.astype(np.int64)
    moving = pa.table({"uid": table.column("uid"), "id": pa.array((s << 32) | positions, pa.int64()),
                       "cluster": pa.array(cluster, pa.int32()), "score": pa.array(score, pa.float32()),
                       "embedding": table.column(IMAGE_COLUMN)})
    out = ShuffleWriter(f"{state_dir}/rows/{name}.arrow")
    out.split(moving, found["group_of"][cluster])
    clusters, sizes = np.unique(cluster, return_counts=True)
    return {"rows": table.num_rows, "clusters": clusters.tolist(), "sizes": sizes.tolist(), "parts": {"rows": out.close()}}
