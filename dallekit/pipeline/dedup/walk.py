"""Passes 10-12 of the dedup: the uid-order walk of each component, and each shard's marks.

10. gather (one task per representative bucket): its nodes (representatives with a confirmed
    edge), edges and members to the walk task of their component (`walk_input/`). A member of a
    representative without edges is a near duplicate of it at 0 bits (`marks/`).
11. walk (one task per group of components): each component walked in uid order: a node is kept
    unless a neighbour earlier in uid order was kept, and a rejected node duplicates its nearest
    kept earlier neighbour (fewest bits, then smallest uid). Rows in different components never
    interact, so this is the sequential walk's result. The walk is a Python loop over the rows
    that have a near-duplicate edge only.
12. final (one task per group of shards): the marks of each shard (exact, gather's and the
    walk's), sorted by uid, to `<scratch>/dups/<shard>.parquet`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dallekit.io import write_table_atomic
from dallekit.pipeline.dedup.columns import (
    ID_SCHEMA,
    LOCAL_ID_MASK,
    MARK_SCHEMA,
    PAIR_SCHEMA,
    REASON_NEAR,
    SHARD_MARK_COLUMNS,
    mark_table,
    numpy_columns,
    read_parquet,
    run_starts,
    shuffle,
    shuffle_marks,
    splitmix64,
)
from dallekit.pipeline.dedup.components import neighbourhoods
from dallekit.pipeline.dedup.state import DedupRun, consumer_items
from dallekit.pipeline.passes import parts_for_consumers, read_shuffle_parts


def gather_task(item: tuple[int, dict], state_dir: str, walkers: int, group_of: list[int]) -> dict:
    """Pass gather, one task per bucket: its nodes, edges and members to the walk task of their component; members of lone representatives marked."""
    p, inputs = item
    u, v, starts = neighbourhoods(inputs["components"])
    nodes = u[starts]
    component = np.minimum(nodes, np.minimum.reduceat(v, starts)) if len(nodes) else nodes  # stars: the centre is the smallest node
    walker = (splitmix64(component) % np.uint64(walkers)).astype(np.int64)
    reps = read_parquet(f"{state_dir}/representatives/{p}.parquet", ["uid", "shard"])
    local = pa.array(nodes & LOCAL_ID_MASK)
    node_rows = pa.table({"id": nodes, "uid": reps["uid"].take(local), "shard": reps["shard"].take(local)}, schema=ID_SCHEMA)
    parts = {"nodes": shuffle(node_rows, walker, f"{state_dir}/walk_input/nodes-{p}.arrow")}
    edges = read_shuffle_parts(inputs["confirmed_edges"], PAIR_SCHEMA)
    at_edge = walker[np.searchsorted(nodes, numpy_columns(edges, "a")[0])]
    parts["edges"] = shuffle(edges, at_edge, f"{state_dir}/walk_input/edges-{p}.arrow")
    members = read_parquet(f"{state_dir}/members/{p}.parquet")
    (rep,) = numpy_columns(members, "id")
    at = np.minimum(np.searchsorted(nodes, rep), max(len(nodes) - 1, 0))
    linked = (nodes[at] == rep) if len(nodes) else np.zeros(len(rep), bool)
    parts["members"] = shuffle(members.filter(pa.array(linked)), walker[at[linked]], f"{state_dir}/walk_input/members-{p}.arrow")
    lone = members.filter(pa.array(~linked))  # no near edge: the representative is kept and is the nearest (0 bits)
    of = reps["uid"].take(pa.array(numpy_columns(lone, "id")[0] & LOCAL_ID_MASK))
    parts["marks"] = shuffle_marks(mark_table(lone, REASON_NEAR, of, np.zeros(lone.num_rows)), state_dir, group_of, f"near-{p}")
    return {"nodes": len(nodes), "parts": parts}


def keep_first(n: int, late: np.ndarray, early: np.ndarray) -> np.ndarray:
    """The sequential walk over ranks 0..n-1: a node is kept unless a neighbour earlier in uid order was kept."""
    keep = [True] * n
    order = np.argsort(late, kind="stable")
    late, early = late[order], early[order]
    starts = run_starts(late)
    earlier = early.tolist()
    for node, lo, hi in zip(late[starts].tolist(), starts.tolist(), np.r_[starts[1:], len(late)].tolist()):
        if any(keep[x] for x in earlier[lo:hi]):
            keep[node] = False
    return np.array(keep, bool)


def nearest(rows: np.ndarray, neighbours: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct row, the neighbour with the fewest bits, ties to the smallest rank: (rows, neighbours, bits)."""
    order = np.lexsort((neighbours, bits, rows))
    pick = order[run_starts(rows[order])]
    return rows[pick], neighbours[pick], bits[pick]


def member_targets(rep: np.ndarray, pos: np.ndarray, kept: np.ndarray, a: np.ndarray, b: np.ndarray,
                   bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour rank, bits) each member duplicates: the walk's result for a row identical to its representative.

    A member m (same pHash and thumbnail as its representative r, later in uid order) has r's
    neighbours, plus r at 0 bits. It is never kept: r or, if r was rejected, r's kept earlier
    neighbour is a kept neighbour before it. So members block nobody and the walk over
    representatives alone decides every representative. m's target is the nearest kept
    neighbour of r with a uid below m's (r itself at 0 bits when kept, which nothing earlier
    can beat). `pos` is the number of nodes with a uid below the member's.
    """
    n = len(kept)
    ends, others, other_bits = np.r_[a, b], np.r_[b, a], np.r_[bits, bits].astype(np.int64)
    use = kept[others]
    ends, others, other_bits = ends[use], others[use], other_bits[use]
    order = np.lexsort((others, ends))
    ends, others, other_bits = ends[order], others[order], other_bits[order]
    best = pd.Series(other_bits * (n + 1) + others).groupby(ends).cummin().to_numpy() if len(ends) else np.zeros(1, np.int64)
    at = np.searchsorted(ends * (n + 1) + others, rep * (n + 1) + pos) - 1  # the last kept neighbour below the member's uid
    chosen = best[np.maximum(at, 0)]
    return np.where(kept[rep], rep, chosen % (n + 1)), np.where(kept[rep], 0, chosen // (n + 1))


def walk_task(item: tuple[int, dict], state_dir: str, group_of: list[int]) -> dict:
    """Pass walk, one task per group of components: the keep-first walk in uid order; marks for rejected nodes and members."""
    w, inputs = item
    nodes = read_shuffle_parts(inputs["nodes"], ID_SCHEMA)
    nodes = nodes.take(pc.sort_indices(nodes, [("uid", "ascending")]))
    (ids,) = numpy_columns(nodes, "id")
    by_id = np.argsort(ids)

    def rank(x: np.ndarray) -> np.ndarray:  # node id -> its rank in uid order
        return by_id[np.searchsorted(ids[by_id], x)]

    a, b, bits = numpy_columns(read_shuffle_parts(inputs["edges"], PAIR_SCHEMA), "a", "b", "bits")
    a, b = rank(a), rank(b)
    late, early = np.maximum(a, b), np.minimum(a, b)
    kept = keep_first(len(ids), late, early)
    hit = kept[early] & ~kept[late]
    rows, of, dist = nearest(late[hit], early[hit], bits[hit].astype(np.int64))
    uids = nodes["uid"]
    marks = [mark_table(nodes.take(pa.array(rows, pa.int64())), REASON_NEAR, uids.take(pa.array(of, pa.int64())), dist)]
    members = read_shuffle_parts(inputs["members"], ID_SCHEMA)
    pos = np.searchsorted(uids.to_numpy(zero_copy_only=False), members["uid"].to_numpy(zero_copy_only=False))
    target, dist = member_targets(rank(numpy_columns(members, "id")[0]), pos, kept, a, b, bits)
    marks.append(mark_table(members, REASON_NEAR, uids.take(pa.array(target, pa.int64())), dist))
    written = shuffle_marks(pa.concat_tables(marks), state_dir, group_of, f"walk-{w}")
    return {"nodes": len(ids), "rejected": len(rows), "members": members.num_rows, "parts": {"marks": written}}


def walk_passes(run: DedupRun, buckets: int, confirmed: list[dict], stars: tuple[str, dict], edges: int) -> tuple[dict, list[dict]]:
    """Passes gather and walk over the components (`stars`: the pass that wrote them and its parts); the stats, and their marks' results."""
    walkers = max(1, math.ceil(2 * edges / run.rows_per_task))
    producer, components = stars
    gathered = run.run("gather", gather_task, consumer_items(range(buckets), confirmed_edges=parts_for_consumers(confirmed, "confirmed_edges"),
                       components=components), state_dir=run.state_dir, walkers=walkers, group_of=run.group_of)
    run.drop(producer, "components")
    run.drop("confirm", "confirmed_edges")
    run.drop("collapse", "representatives", "members")
    inputs = {kind: parts_for_consumers(gathered, kind) for kind in ("nodes", "edges", "members")}
    walked = run.run("walk", walk_task, consumer_items(range(walkers), **inputs), state_dir=run.state_dir, group_of=run.group_of)
    run.drop("gather", "walk_input")
    return {"edge_nodes": sum(r["nodes"] for r in walked)}, gathered + walked


def final_task(item: tuple[int, dict], work_dir: str, names: list[str], groups: list[list[int]]) -> dict:
    """Pass final, one task per group of shards: each shard's marks sorted by uid, to <scratch>/dups/<shard>.parquet."""
    g, inputs = item
    marks = read_shuffle_parts(inputs["marks"], MARK_SCHEMA)
    marks = marks.take(pc.sort_indices(marks, [("shard", "ascending"), ("uid", "ascending")]))
    (shard,) = numpy_columns(marks, "shard")
    out = {}
    for s in groups[g]:
        lo, hi = np.searchsorted(shard, s, "left"), np.searchsorted(shard, s, "right")
        write_table_atomic(marks.slice(lo, hi - lo).select(SHARD_MARK_COLUMNS), f"{work_dir}/dups/{names[s]}.parquet")
        out[names[s]] = int(hi - lo)
    return {"marks_per_shard": out}
