"""The one check that a stage's uids are unique: clean's scan and its dedup word a repeated or missing uid alike."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from dallekit.errors import BadInputError


def check_unique_uids(uids: pa.ChunkedArray, shards: pa.ChunkedArray | str) -> None:
    """Raise BadInputError naming a repeated (or missing) uid and its shard(s): clean marks and joins rows by uid.

    `shards` is the shard file of every row, or one name for all of them. Cheap when the uids are
    unique (one hash count); only a failure looks further.
    """
    def where(rows: pa.ChunkedArray) -> str:
        return shards if isinstance(shards, str) else " and ".join(sorted(set(shards.filter(rows).to_pylist())))

    hint = "was this folder written by `dallekit download`?"
    if uids.null_count:
        raise BadInputError(f"{where(pc.is_null(uids))}: {uids.null_count} row(s) without a uid ({hint})")
    if pc.count_distinct(uids).as_py() == len(uids):
        return
    counts = pc.value_counts(uids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    uid, times = min(zip(repeated.field("values").to_pylist(), repeated.field("counts").to_pylist()))
    raise BadInputError(
        f"{where(pc.equal(uids, uid))}: uid {uid} appears {'twice' if times == 2 else f'{times} times'} (uids must be unique; {hint})"
    )
