"""Pass 1 of the semantic dedup, eligible (one task per shard): which of the shard's embedded rows take part.

The caller's `eligible(name, uids) -> bool mask` says it (the filter: rows that pass every other
rule); without one every row does. The task writes the eligible rows' positions in the
embeddings shard (`eligible/<shard>.parquet`, int32) and returns their count: the driver holds
counts, never rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from dallekit.errors import BadInputError
from dallekit.io import read_shard, shard_schema, write_table_atomic
from dallekit.pipeline.dedup.columns import INTERMEDIATE_PARQUET

Eligibility = Callable[[str, pa.ChunkedArray], np.ndarray]  # (shard name, the embeddings shard's uids) -> which rows take part


def eligible_path(state_dir: str, name: str) -> str:
    """Where the eligible pass writes one shard's row positions."""
    return f"{state_dir}/eligible/{name}.parquet"


def eligible_task(item: tuple[str, str], state_dir: str, eligible: Eligibility | None) -> dict:
    """Pass eligible: the count of the shard's rows that take part, and (with a rule) their positions in its embeddings shard."""
    name, path = item
    if eligible is None:
        return {"rows": shard_schema(path)[1]}
    uids = read_shard(path, ["uid"]).column("uid")
    mask = np.asarray(eligible(name, uids), bool)
    if mask.shape != (len(uids),):
        raise BadInputError(f"{path}: the eligibility rule gave {mask.shape[0]} values for {len(uids)} rows")
    rows = np.flatnonzero(mask).astype(np.int32)
    write_table_atomic(pa.table({"row": rows}), eligible_path(state_dir, name), **INTERMEDIATE_PARQUET)
    return {"rows": len(rows)}


def eligible_rows(state_dir: str, name: str, filtered: bool) -> np.ndarray | None:
    """The positions the eligible pass kept in one shard; None when every row takes part."""
    if not filtered:
        return None
    return read_shard(eligible_path(state_dir, name), ["row"]).column("row").to_numpy()
