"""Pass 4 of the semantic dedup, pairs: cosines within clusters, each row's best higher-priority neighbour above the threshold.

A task is either some whole clusters of one consumer group (at most `pair_rows` rows together),
or one block pair (i <= j) of a cluster larger than that: such a cluster is split into
b = ceil(2 n / pair_rows) blocks by a hash of each row's id, and every pair of blocks is a task,
so every pair of its rows is compared by exactly one task. A task reads its group's shuffle parts
one at a time, keeping only its own rows, so it holds its rows and one part.

Within a task, rows are in keep order (`columns.priority_order`); cosines are float32 matmuls of
chunks of rows against the rows before them (at most CHUNK_CELLS cosines at a time, never n x n).
For every row with a higher-priority row above 1 - eps, the task emits the highest-priority one
(its uid, the cosine, its score). The rule is a max over those candidates, so block pairs need no
order between them: the final pass keeps each row's best candidate over all tasks.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dallekit.pipeline.passes import ShuffleWriter, read_shuffle_parts
from dallekit.pipeline.semdedup.columns import CANDIDATE_SCHEMA, block_of, priority_order, row_schema, vectors

CHUNK_CELLS = 1 << 23  # cosines held at once by a task: 32 MiB of float32
MARGIN = 1e-4  # a float32 matmul cosine this far below the threshold is checked exactly (its error is ~1e-6 at D = 1024)


def _own_rows(refs: list[list], spec: dict, schema: pa.Schema) -> pa.Table:
    """The task's rows from its group's parts, read one part at a time."""
    parts = []
    for ref in refs:
        part = read_shuffle_parts([ref], schema)
        if "clusters" in spec:
            part = part.filter(pc.is_in(part["cluster"], pa.array(spec["clusters"], pa.int32())))
        else:
            part = part.filter(pc.equal(part["cluster"], spec["cluster"]))
            blocks = block_of(part["id"].to_numpy(), spec["blocks"])
            part = part.filter(pa.array(np.isin(blocks, spec["pair"])))
        parts.append(part)
    return pa.concat_tables(parts).combine_chunks() if parts else schema.empty_table()  # one chunk: each take copies only its rows


def exact_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise a . b in float64 (float16 values multiply exactly): the same value whatever task or chunk computes it."""
    return (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1)


def first_confirmed(hit: np.ndarray, left: np.ndarray, right: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `hit` (rows: vectors `left`, columns: vectors `right`), the first hit column whose exact cosine is above the threshold.

    The matmul's float32 cosines depend on the shapes multiplied, so they only nominate (within
    MARGIN); the decision and the reported cosine are `exact_cosine`'s, and a block split changes nothing.
    """
    best, sim = np.full(len(hit), -1, np.int64), np.zeros(len(hit), np.float32)
    todo = np.flatnonzero(hit.any(axis=1))
    while len(todo):
        cols = np.argmax(hit[todo], axis=1)
        exact = exact_cosine(left[todo], right[cols])
        ok = exact > threshold
        best[todo[ok]], sim[todo[ok]] = cols[ok], exact[ok]
        hit[todo[~ok], cols[~ok]] = False
        todo = todo[~ok]
        todo = todo[hit[todo].any(axis=1)]
    return best, sim


def within(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For rows x in keep order: the first earlier row with cosine > threshold (-1: none), and that cosine."""
    n = len(x)
    best, sim = np.full(n, -1, np.int64), np.zeros(n, np.float32)
    # chunks of at most CHUNK_CELLS cosines, and at least 8 per cluster above 2,048 rows: each chunk
    # multiplies its rows by the rows up to its own, so the work is ~9/16 of the square, not all of it
    step = max(1, min(CHUNK_CELLS // max(1, n), max(256, -(-n // 8))))
    for a in range(0, n, step):
        b = min(n, a + step)
        hit = x[a:b] @ x[:b].T > threshold - MARGIN  # (b - a, b): each row against itself and every row before it
        hit[:, a:b] &= np.tri(b - a, k=-1, dtype=bool)  # only rows before it count
        best[a:b], sim[a:b] = first_confirmed(hit, x[a:b], x[:b], threshold)
    return best, sim


def across(xa: np.ndarray, xb: np.ndarray, rank_a: np.ndarray, rank_b: np.ndarray,
           threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two blocks in keep order (their rows' ranks in the keep order of both): each row's first higher-priority row of the other block above the threshold.

    Returns (best B row per A row, cosine, best A row per B row, cosine), -1 where none.
    """
    na, nb = len(xa), len(xb)
    best_a, sim_a = np.full(na, -1, np.int64), np.zeros(na, np.float32)
    best_b, sim_b = np.full(nb, -1, np.int64), np.zeros(nb, np.float32)
    step = max(1, CHUNK_CELLS // max(1, nb))
    for a in range(0, na, step):
        b = min(na, a + step)
        close, before = xa[a:b] @ xb.T > threshold - MARGIN, rank_a[a:b, None] < rank_b[None, :]
        best_a[a:b], sim_a[a:b] = first_confirmed(close & ~before, xa[a:b], xb, threshold)  # B's row is the higher-priority one
        # A's row is: rows come in keep order, so the first chunk that confirms one holds the best
        found, found_sim = first_confirmed((close & before).T, xb, xa[a:b], threshold)
        new = (found >= 0) & (best_b < 0)
        best_b[new], sim_b[new] = a + found[new], found_sim[new]
    return best_a, sim_a, best_b, sim_b


def _emit(rows: pa.Table, src: np.ndarray, dup: np.ndarray, sim: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """Candidates (row src's best is row dup, at cosine sim) as a table, and the shard of each."""
    src, dup = pa.array(src, pa.int64()), pa.array(dup, pa.int64())
    table = pa.table({"uid": rows["uid"].take(src), "duplicate_of": rows["uid"].take(dup),
                      "semantic_similarity": pa.array(sim, pa.float32()), "of_score": rows["score"].take(dup)}, schema=CANDIDATE_SCHEMA)
    return table, (rows["id"].take(src).to_numpy() >> 32)


def _within_clusters(rows: pa.Table, threshold: float) -> tuple[pa.Table, np.ndarray]:
    """The candidates of whole clusters (or of one block with itself): rows sorted by cluster, then keep order."""
    rows = rows.take(pc.sort_indices(rows, [("cluster", "ascending"), ("score", "descending"), ("uid", "ascending")]))
    clusters = rows["cluster"].to_numpy()
    starts = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1]]) if len(clusters) else np.zeros(0, np.int64)
    src, dup, sims = [], [], []
    for lo, hi in zip(starts.tolist(), np.r_[starts[1:], len(clusters)].tolist()):
        best, sim = within(vectors(rows["embedding"].slice(lo, hi - lo)), threshold)
        hit = np.flatnonzero(best >= 0)
        src.append(lo + hit)
        dup.append(lo + best[hit])
        sims.append(sim[hit])
    if not src:
        return CANDIDATE_SCHEMA.empty_table(), np.zeros(0, np.int64)
    return _emit(rows, np.concatenate(src), np.concatenate(dup), np.concatenate(sims))


def _across_blocks(rows: pa.Table, spec: dict, threshold: float) -> tuple[pa.Table, np.ndarray]:
    """The candidates between two blocks of one cluster: pairs with one row in each."""
    rows = rows.take(pa.array(priority_order(rows["score"].to_numpy(), rows["uid"]), pa.int64()))  # rank = position
    blocks = block_of(rows["id"].to_numpy(), spec["blocks"])
    in_a, in_b = np.flatnonzero(blocks == spec["pair"][0]), np.flatnonzero(blocks == spec["pair"][1])
    xa, xb = vectors(rows["embedding"].take(pa.array(in_a))), vectors(rows["embedding"].take(pa.array(in_b)))
    best_a, sim_a, best_b, sim_b = across(xa, xb, in_a, in_b, threshold)
    hit_a, hit_b = np.flatnonzero(best_a >= 0), np.flatnonzero(best_b >= 0)
    src = np.r_[in_a[hit_a], in_b[hit_b]]
    dup = np.r_[in_b[best_a[hit_a]], in_a[best_b[hit_b]]]
    return _emit(rows, src, dup, np.r_[sim_a[hit_a], sim_b[hit_b]])


def pairs_task(item: tuple[dict, dict], state_dir: str, dim: int, threshold: float) -> dict:
    """Pass pairs: one task's clusters or block pair; each row's best candidate, shuffled back by the row's shard."""
    spec, inputs = item
    rows = _own_rows(inputs["rows"], spec, row_schema(dim))
    if "clusters" in spec or spec["pair"][0] == spec["pair"][1]:
        found, shard = _within_clusters(rows, threshold)
    else:
        found, shard = _across_blocks(rows, spec, threshold)
    out = ShuffleWriter(f"{state_dir}/pairs/{spec['key']}.arrow")
    out.split(found, shard)
    return {"rows": rows.num_rows, "candidates": found.num_rows, "parts": {"candidates": out.close()}}


def plan_pairs(sizes: np.ndarray, group_of: np.ndarray, pair_rows: int) -> list[dict]:
    """The pairs tasks from the rows per cluster: whole clusters packed per group up to pair_rows, larger ones as block pairs."""
    tasks: list[dict] = []
    for g in np.unique(group_of[sizes > 0]).tolist():
        packed, held = [], 0
        for c in np.flatnonzero((group_of == g) & (sizes > 0)).tolist():
            n = int(sizes[c])
            if n > pair_rows:
                blocks = -(-2 * n // pair_rows)
                tasks += [{"group": g, "cluster": c, "blocks": blocks, "pair": [i, j]} for i in range(blocks) for j in range(i, blocks)]
                continue
            if packed and held + n > pair_rows:
                tasks.append({"group": g, "clusters": packed})
                packed, held = [], 0
            packed.append(c)
            held += n
        if packed:
            tasks.append({"group": g, "clusters": packed})
    return [spec | {"key": str(t)} for t, spec in enumerate(tasks)]
