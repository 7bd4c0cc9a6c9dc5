"""Passes 1-2 of the dedup: every uid unique, and exact duplicates (same sha256) marked in uid order.

1. split (one task per group of scan shards): every uid to a uid bucket (`by_uid/`), every
   surviving row (no reason yet) to a sha256 bucket (`by_sha256/`): hash partitioning.
2. exact (one task per bucket): repeated uids (BadInputError, worded by `check_unique_uids`),
   then the sha256 repeats: the first in uid order keeps, the others are `duplicate_image` of it
   (`marks/`). A null sha256 equals nothing. With the near passes to come, the rows that are
   not exact duplicates go back to their shard's group (`survivors/`).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dallekit.errors import BadInputError
from dallekit.pipeline.dedup.columns import (
    REASON_EXACT,
    SCAN_ROW_SCHEMA,
    SHA_SCHEMA,
    UID_SCHEMA,
    mark_table,
    numpy_columns,
    read_parquet,
    shuffle,
    shuffle_marks,
    string_bucket_hash,
)
from dallekit.pipeline.dedup.state import DedupRun, consumer_items
from dallekit.pipeline.passes import parts_for_consumers, read_shuffle_parts
from dallekit.pipeline.uids import check_unique_uids


def split_task(item: tuple[int, list[int]], state_dir: str, work_dir: str, names: list[str], buckets: int) -> dict:
    """Pass split, one task per group of scan shards: every uid to its uid bucket, every surviving row to its sha256 bucket."""
    g, shards = item
    parts = []
    for s in shards:
        scan = read_parquet(f"{work_dir}/scan/{names[s]}.parquet", ["uid", "reason", "sha256"])
        parts += [scan.append_column("shard", pa.array(np.full(scan.num_rows, s, np.int32)))
                  .append_column("row", pa.array(np.arange(scan.num_rows, dtype=np.int32)))]
    rows = pa.concat_tables(parts)
    nulls = [[names[s], part["uid"].null_count] for s, part in zip(shards, parts)]
    if rows["uid"].null_count:
        rows = rows.filter(pc.is_valid(rows["uid"]))
    uid_parts = shuffle(rows.select(UID_SCHEMA.names).cast(UID_SCHEMA), string_bucket_hash(rows["uid"]) % np.uint64(buckets),
                        f"{state_dir}/by_uid/{g}.arrow")
    live = rows.filter(pc.is_null(rows["reason"])).select(SHA_SCHEMA.names).cast(SHA_SCHEMA)
    sha_parts = shuffle(live, string_bucket_hash(pc.fill_null(live["sha256"], "")) % np.uint64(buckets),
                        f"{state_dir}/by_sha256/{g}.arrow")
    return {"nulls": [x for x in nulls if x[1]], "survivors": live.num_rows, "parts": {"uid": uid_parts, "sha": sha_parts}}


def repeated_uid(uids: pa.Table, names: list[str]) -> list | None:
    """[uid, message] for the smallest uid of the bucket seen twice, worded by check_unique_uids; None when all are unique."""
    if uids.num_rows < 2 or pc.count_distinct(uids["uid"]).as_py() == uids.num_rows:
        return None
    counts = pc.value_counts(uids["uid"])
    uid = pc.min(counts.field("values").filter(pc.greater(counts.field("counts"), 1))).as_py()
    rows = uids.filter(pc.equal(uids["uid"], uid))
    try:
        check_unique_uids(rows["uid"], pa.chunked_array([[f"{names[s]}.parquet" for s in rows["shard"].to_pylist()]]))
    except BadInputError as err:
        return [uid, str(err)]
    return None


def exact_task(item: tuple[int, dict], state_dir: str, names: list[str], group_of: list[int], near: bool) -> dict:
    """Pass exact, one task per bucket: repeated uids, then sha256 repeats (the first in uid order keeps); survivors back to their group."""
    b, inputs = item
    repeat = repeated_uid(read_shuffle_parts(inputs["uid"], UID_SCHEMA), names)
    rows = read_shuffle_parts(inputs["sha"], SHA_SCHEMA)
    rows = rows.take(pc.sort_indices(rows, [("sha256", "ascending"), ("uid", "ascending")]))
    n, sha = rows.num_rows, rows["sha256"]
    same = np.zeros(n, bool)
    if n > 1:  # a null sha256 equals nothing
        same[1:] = pc.fill_null(pc.equal(sha.slice(1), sha.slice(0, n - 1)), False).to_numpy(zero_copy_only=False)
    first = np.maximum.accumulate(np.where(same, 0, np.arange(n)))
    dups = np.flatnonzero(same)
    marks = mark_table(rows.take(dups), REASON_EXACT, rows["uid"].take(first[dups]), np.zeros(len(dups)))
    parts = {"marks": shuffle_marks(marks, state_dir, group_of, f"exact-{b}")}
    if near:
        live = rows.filter(pa.array(~same)).select(SCAN_ROW_SCHEMA.names)
        groups = np.asarray(group_of, np.int64)[numpy_columns(live, "shard")[0]]
        parts["survivors"] = shuffle(live, groups, f"{state_dir}/survivors/{b}.arrow")
    return {"repeat": repeat, "duplicates": len(dups), "parts": parts}


def _missing_uids(split: list[dict]) -> None:
    """Rows without a uid are bad input, worded as check_unique_uids words them, for every shard with such rows."""
    nulls = [(name, n) for result in split for name, n in result["nulls"]]
    if nulls:
        check_unique_uids(pa.chunked_array([[None] * sum(n for _, n in nulls)], pa.string()),
                          pa.chunked_array([[f"{name}.parquet" for name, n in nulls for _ in range(n)]]))


def exact_passes(run: DedupRun, total: int, near: bool) -> tuple[dict, list[dict]]:
    """Passes split and exact: uid uniqueness and sha256 repeats; the stats, and the exact pass's results (marks, survivors)."""
    buckets = max(1, math.ceil(total / run.rows_per_task))
    split = run.run("split", split_task, {str(g): (g, shards) for g, shards in enumerate(run.groups)},
                    state_dir=run.state_dir, work_dir=run.work_dir, names=run.names, buckets=buckets)
    _missing_uids(split)
    survivors = sum(result["survivors"] for result in split)
    inputs = {"uid": parts_for_consumers(split, "uid"), "sha": parts_for_consumers(split, "sha")}
    exact = run.run("exact", exact_task, consumer_items(range(buckets), **inputs),
                    state_dir=run.state_dir, names=run.names, group_of=run.group_of, near=near)
    repeats = [result["repeat"] for result in exact if result["repeat"]]
    if repeats:  # the smallest repeated uid, as one check over all rows would name it
        raise BadInputError(min(repeats)[1])
    run.drop("split", "by_uid", "by_sha256")
    stats = {"rows": total, "survivors": survivors, "exact_duplicates": sum(r["duplicates"] for r in exact),
             "near_buckets": max(1, math.ceil(survivors / run.rows_per_task)) if near else 0}
    return stats, exact
