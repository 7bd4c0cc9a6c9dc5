"""Pass 9 of the dedup: connected components of the confirmed edges (Kiveris et al., SoCC 2014).

components<r> (one task per node bucket and round): the alternating large-star (even rounds) and
small-star (odd rounds) operations, each round one pass over edge buckets (`components/<r>/`,
edges (u, v) in the bucket of u, both directions). Both keep the components and end, in
O(log^2 n) rounds, with every component a star around its smallest node. The rounds stop after
one whose input already was stars in every bucket.

Components are chains of near duplicates, in practice a few to a few hundred rows; all nodes of
one component end in one walk task.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dallekit.pipeline.dedup.columns import EDGE_SCHEMA, numpy_columns, run_starts, shuffle
from dallekit.pipeline.dedup.state import DedupRun, consumer_items
from dallekit.pipeline.passes import parts_for_consumers, read_shuffle_parts

MAX_ROUNDS = 100  # large-star/small-star converges in O(log^2 n) rounds; more means a bug


def shuffle_edges(u: np.ndarray, v: np.ndarray, folder: str, source: int) -> dict[str, list]:
    """Directed edges (u, v) to the bucket of u, for the next components round; the index of the file written."""
    keep = u != v
    return shuffle(pa.table({"u": u[keep], "v": v[keep]}, schema=EDGE_SCHEMA), u[keep] >> 32, f"{folder}/{source}.arrow")


def neighbourhoods(refs: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bucket's edges (u, v) once each, sorted by (u, v), and the start of each u's run."""
    u, v = numpy_columns(read_shuffle_parts(refs, EDGE_SCHEMA), "u", "v")
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    once = np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])] if len(u) else np.zeros(0, bool)
    u, v = u[once], v[once]
    return u, v, run_starts(u)


def star_round_task(item: tuple[int, dict], state_dir: str, round_no: int) -> dict:
    """Pass components<r>, one task per node bucket: large-star (even rounds) or small-star (odd) of Kiveris et al.

    Whether this bucket's input already is stars is checked per node: a node either has only
    larger neighbours (a centre) or exactly one, smaller (a leaf).
    """
    p, inputs = item
    u, v, starts = neighbourhoods(inputs["components"])
    if not len(u):
        return {"star": True, "edges": 0, "parts": {"components": {}}}
    nodes, lowest, degree = u[starts], np.minimum.reduceat(v, starts), np.diff(np.r_[starts, len(u)])
    star = bool(np.all((lowest > nodes) | ((degree == 1) & (lowest < nodes))))
    if round_no % 2 == 0:  # large-star: every larger neighbour of u links to the smallest of u and its neighbours
        centre = np.repeat(np.minimum(nodes, lowest), degree)
        larger = v > u
        x, y = v[larger], centre[larger]
    else:  # small-star: u and its smaller neighbours link to the smallest of them
        smaller = v < u
        su, sv = u[smaller], v[smaller]
        firsts = run_starts(su)
        centre = np.repeat(sv[firsts], np.diff(np.r_[firsts, len(su)]))
        x, y = np.r_[sv, su[firsts]], np.r_[centre, sv[firsts]]
    parts = shuffle_edges(np.r_[x, y], np.r_[y, x], f"{state_dir}/components/{round_no + 1}", p)
    return {"star": star, "edges": len(u), "parts": {"components": parts}}


def connected_components(run: DedupRun, buckets: int, confirmed: list[dict]) -> tuple[int, str, dict[str, list]]:
    """Star rounds until every bucket's edges form stars: the rounds, the pass that wrote the stars, and its parts per bucket."""
    producer, inputs = "confirm", parts_for_consumers(confirmed, "components")
    for r in range(MAX_ROUNDS):
        result = run.run(f"components{r}", star_round_task, consumer_items(range(buckets), components=inputs),
                         state_dir=run.state_dir, round_no=r)
        run.drop(producer, f"components/{r}")
        producer, inputs = f"components{r}", parts_for_consumers(result, "components")
        if all(x["star"] for x in result):  # round r's input was stars: its output is the same stars
            return r + 1, producer, inputs
    raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
