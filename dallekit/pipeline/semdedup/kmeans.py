"""Pass 2 of the semantic dedup, kmeans (one task): two-level spherical k-means on a bounded sample of eligible rows.

The task reads a spread of shards (evenly spaced over the eligible rows, only as many as hold
about twice the sample), draws at most `sample` eligible rows from them (seeded) and trains
`faiss.Kmeans` (spherical, seeded) in two levels: about sqrt(k) coarse centroids, then within
each coarse cluster its share of the k fine centroids (by its share of the sample). A row's
`semantic_cluster` is the fine centroid nearest to it among those of its nearest coarse
centroid, so assigning a row costs about 2 sqrt(k) dot products, not k: rows/s does not fall as
k grows with the data (a flat search over k = N / 2,000 centroids would make the cost per row
grow with N), and neither does training (sample x 2 sqrt(k), not sample x k).

The centroids, and the consumer group of every cluster (clusters packed in id order so that
each group expects at most `group_rows` rows, from the sample's counts), are one .npz file
(`kmeans/centroids.npz`, read with allow_pickle=False), vouched for by the task's mark.
"""

from __future__ import annotations

import math

import numpy as np

from dallekit.io import atomic_file
from dallekit.pipeline.semdedup.columns import READ_BATCH, read_vectors
from dallekit.pipeline.semdedup.eligible import eligible_rows

NITER = 20  # k-means iterations at each level
SAMPLE_SHARDS = 16  # the sample comes from at least this many shards (all when fewer), so that it is not one corner of the input
MIN_POINTS_PER_CENTROID = 4  # a cluster count above sample / this is refused: too few sampled rows to place the centroids


def centroids_path(state_dir: str) -> str:
    """The kmeans task's one output."""
    return f"{state_dir}/kmeans/centroids.npz"


def spread(counts: list[int], wanted: int) -> list[int]:
    """At least SAMPLE_SHARDS evenly spaced shards (of those with eligible rows) whose rows add up to at least `wanted` (all when fewer)."""
    have = [s for s, n in enumerate(counts) if n]
    if sum(counts) <= wanted:
        return have
    for m in range(max(SAMPLE_SHARDS, len(have) * wanted // sum(counts)), len(have) + 1):
        chosen = sorted({have[int(i)] for i in np.linspace(0, len(have) - 1, m).round()})
        if sum(counts[s] for s in chosen) >= wanted:
            return chosen
    return have


def draw_sample(state_dir: str, shards: list[tuple[str, str, int]], sample: int, seed: int, filtered: bool) -> np.ndarray:
    """At most `sample` eligible rows (float32 image vectors) from a spread of shards, one shard read at a time into one array."""
    chosen = spread([n for _, _, n in shards], 2 * sample)
    available = sum(shards[s][2] for s in chosen)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(available, size=min(sample, available), replace=False))
    x, start, filled = None, 0, 0
    for s in chosen:
        name, path, n = shards[s]
        mine = picked[(picked >= start) & (picked < start + n)] - start
        start += n
        if len(mine):
            rows = eligible_rows(state_dir, name, filtered)
            _, image, _ = read_vectors(path, mine if rows is None else rows[mine], text=False)
            x = np.empty((len(picked), image.shape[1]), np.float32) if x is None else x
            x[filled : filled + len(image)] = image
            filled += len(image)
    return x  # the driver runs no k-means without eligible rows


def train(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k unit centroids of the rows of x (faiss.Kmeans, spherical, seeded); each row its own when there are no more rows than k."""
    if len(x) <= k:
        return normalise(x.copy())
    if k == 1:
        return normalise(x.mean(axis=0, keepdims=True))
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=NITER, seed=seed, spherical=True, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    km.train(np.ascontiguousarray(x))
    return normalise(km.centroids)


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1)).astype(np.float32)


def shares(k: int, counts: np.ndarray) -> np.ndarray:
    """k fine clusters apportioned to coarse clusters by their sampled rows (largest remainder), each at least 1 and at most its rows."""
    raw = k * counts / max(1, counts.sum())
    out = np.minimum(np.maximum(np.floor(raw), 1), counts).astype(np.int64)
    out[counts == 0] = 0
    for j in np.argsort(-(raw - np.floor(raw)), kind="stable"):
        if out.sum() >= k:
            break
        if out[j] < counts[j]:
            out[j] += 1
    return out


def nearest(x: np.ndarray, coarse: np.ndarray, fine: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fine cluster, cosine to it) of each row of x: the nearest coarse centroid, then the nearest of its fine ones; ties to the lower id.

    Float32 matmuls READ_BATCH rows at a time, so a float16 shard is never held in float32 whole.
    """
    cluster, cosine = np.zeros(len(x), np.int32), np.zeros(len(x), np.float32)
    for lo in range(0, len(x), READ_BATCH):
        part = x[lo : lo + READ_BATCH].astype(np.float32)
        top = np.argmax(part @ coarse.T, axis=1)
        for j in np.unique(top):
            rows = np.flatnonzero(top == j)
            first, last = offsets[j], offsets[j + 1]
            sims = part[rows] @ fine[first:last].T
            best = np.argmax(sims, axis=1)
            cluster[lo + rows] = first + best
            cosine[lo + rows] = sims[np.arange(len(rows)), best]
    return cluster, cosine


def pack_groups(expected: np.ndarray, group_rows: int) -> np.ndarray:
    """The consumer group of each cluster: consecutive clusters packed while their expected rows stay within group_rows."""
    group_of, group, held = np.zeros(len(expected), np.int32), 0, 0.0
    for c, rows in enumerate(expected.tolist()):
        if held and held + rows > group_rows:
            group, held = group + 1, 0.0
        group_of[c], held = group, held + rows
    return group_of


def kmeans_task(item: dict, state_dir: str, shards: list[tuple[str, str, int]], filtered: bool, group_rows: int) -> dict:
    """Pass kmeans: sample, train both levels, pack clusters into consumer groups; writes centroids.npz."""
    k, seed, total = item["clusters"], item["seed"], sum(n for _, _, n in shards)
    x = draw_sample(state_dir, shards, item["sample"], seed, filtered)
    k1 = max(1, math.isqrt(k))
    coarse = train(x, k1, seed)
    top = np.argmax(x @ coarse.T, axis=1)
    per_coarse = shares(k, np.bincount(top, minlength=len(coarse)))
    used = np.flatnonzero(per_coarse)  # a coarse centroid no sampled row is nearest to has no fine ones: rows go to the next nearest
    fine = np.concatenate([train(x[top == j], int(per_coarse[j]), seed + 1 + int(j)) for j in used])
    coarse, offsets = coarse[used], np.r_[0, np.cumsum(per_coarse[used])].astype(np.int64)
    cluster, _ = nearest(x, coarse, fine, offsets)
    expected = np.bincount(cluster, minlength=len(fine)) * (total / max(1, len(x)))
    group_of = pack_groups(expected, group_rows)
    with atomic_file(centroids_path(state_dir)) as f:
        np.savez(f, coarse=coarse, fine=fine, offsets=offsets, group_of=group_of)
    return {"clusters": len(fine), "coarse": len(coarse), "groups": int(group_of.max()) + 1, "sampled": len(x)}


def load_centroids(state_dir: str) -> dict[str, np.ndarray]:
    """The kmeans task's arrays: coarse, fine, offsets, group_of."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(centroids_path(state_dir))
    with fs.open(p, "rb") as f, np.load(f, allow_pickle=False) as found:
        return {name: found[name] for name in ("coarse", "fine", "offsets", "group_of")}
