"""Pass 5 of the semantic dedup, final (one task per shard): each row's best candidate over all pairs tasks, beside its cluster.

The candidates of one row may come from several block-pair tasks; the one kept is the
highest-priority row (its score descending, then its uid ascending), which is the row SemDeDup
names: the first row in keep order that is within eps. The task writes
`<out>/<shard>.parquet`: every eligible row's uid, semantic_cluster and centroid_similarity,
and for duplicates duplicate_of and semantic_similarity (null for the rows kept).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dallekit.io import read_shard, write_table_atomic
from dallekit.pipeline.passes import read_shuffle_parts
from dallekit.pipeline.semdedup.assign import assigned_path
from dallekit.pipeline.semdedup.columns import CANDIDATE_SCHEMA, OUTPUT_SCHEMA


def best_candidates(candidates: pa.Table) -> pa.Table:
    """One candidate per uid: the highest-priority duplicate_of (its score descending, then its uid)."""
    if not candidates.num_rows:
        return candidates
    candidates = candidates.take(pc.sort_indices(candidates, [("uid", "ascending"), ("of_score", "descending"),
                                                              ("duplicate_of", "ascending")]))
    uids = candidates["uid"]
    first = np.r_[True, ~pc.equal(uids.slice(1), uids.slice(0, len(uids) - 1)).to_numpy(zero_copy_only=False)]
    return candidates.filter(pa.array(first))


def final_task(item: tuple[int, dict], state_dir: str, names: list[str], out_dir: str) -> dict:
    """Pass final: one shard's clusters and duplicates to <out_dir>/<shard>.parquet; its eligible and duplicate counts."""
    s, inputs = item
    assigned = read_shard(assigned_path(state_dir, names[s]))
    best = best_candidates(read_shuffle_parts(inputs["candidates"], CANDIDATE_SCHEMA))
    at = pc.index_in(assigned["uid"], best["uid"])
    found = pc.is_valid(at)
    index = pc.fill_null(at, 0)
    pick = (lambda column: pc.if_else(found, best[column].take(index), pa.nulls(len(at), best.schema.field(column).type))) \
        if best.num_rows else (lambda column: pa.nulls(assigned.num_rows, CANDIDATE_SCHEMA.field(column).type))
    table = pa.table({"uid": assigned["uid"], "semantic_cluster": assigned["semantic_cluster"],
                      "centroid_similarity": assigned["centroid_similarity"], "duplicate_of": pick("duplicate_of"),
                      "semantic_similarity": pick("semantic_similarity")}, schema=OUTPUT_SCHEMA)
    write_table_atomic(table, f"{out_dir}/{names[s]}.parquet")
    return {"rows": table.num_rows, "duplicates": best.num_rows}
