"""What the semantic dedup passes pass each other: their shuffles' schemas, the keep priority, and where files live.

A row's *priority* is the order in which a cluster keeps rows: its `score` (the cosine to its
centroid, or its CLIP score) descending, then its uid ascending. Every pass reads the score the
assign pass computed once, so two tasks never order the same rows differently.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dallekit.pipeline.embeddings import IMAGE_COLUMN, TEXT_COLUMN, check_table, embedding_matrix
from dallekit.pipeline.hashing import mix64

REASON = "semantic_duplicate"
KEEP_CHOICES = ("centroid", "clip_score")  # --semantic-dedup-keep: what a cluster keeps first

# one assigned row on its way to a pairs task: `id` is shard << 32 | row (a split cluster's block is a hash of it)
ROW_FIELDS = [("uid", pa.string()), ("id", pa.int64()), ("cluster", pa.int32()), ("score", pa.float32())]
# a row's best higher-priority neighbour found by one pairs task, on its way back to its shard
CANDIDATE_SCHEMA = pa.schema([("uid", pa.string()), ("duplicate_of", pa.string()), ("semantic_similarity", pa.float32()),
                              ("of_score", pa.float32())])
# what the run writes per input shard: every eligible row's cluster, and the duplicates' kept row
OUTPUT_SCHEMA = pa.schema([("uid", pa.string()), ("semantic_cluster", pa.int32()), ("centroid_similarity", pa.float32()),
                           ("duplicate_of", pa.string()), ("semantic_similarity", pa.float32())])
READ_BATCH = 8192  # rows of an embeddings shard decoded at a time


def row_schema(dim: int) -> pa.Schema:
    """The schema of assigned rows with their float16 image embedding of `dim` values."""
    return pa.schema(ROW_FIELDS + [("embedding", pa.list_(pa.float16(), dim))])


def read_vectors(path: str, rows: np.ndarray | None, text: bool) -> tuple[pa.Table, np.ndarray, np.ndarray | None]:
    """The rows at sorted positions `rows` (None: all) of an embeddings shard: (uid and image_embedding, (n, D) float16 image vectors, text ones or None).

    Read READ_BATCH rows at a time, keeping only the rows asked for: Arrow's reader of a whole
    float16 list column peaks at several times the column's size.
    """
    from dallekit.io import open_shard

    columns = ["uid", IMAGE_COLUMN] + ([TEXT_COLUMN] if text else [])
    shard = open_shard(path)
    batches, start = [], 0
    for batch in shard.iter_batches(batch_size=READ_BATCH, columns=columns):
        if rows is not None:
            mine = rows[(rows >= start) & (rows < start + batch.num_rows)] - start
            start += batch.num_rows
            batch = batch.take(pa.array(mine, pa.int64()))
        batches.append(batch)
    # one chunk: Arrow's take on a chunked list column concatenates every chunk per call (the shuffle takes once per consumer)
    table = check_table(path, pa.Table.from_batches(batches, pa.schema([shard.schema_arrow.field(name) for name in columns])).combine_chunks())
    image = embedding_matrix(table.column(IMAGE_COLUMN))
    words = embedding_matrix(table.column(TEXT_COLUMN)) if text else None
    return table.select(["uid", IMAGE_COLUMN]), image, words


def priority_order(scores: np.ndarray, uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Row positions in keep order: score descending, then uid ascending."""
    table = pa.table({"score": pa.array(scores, pa.float32()), "uid": uids})
    return pc.sort_indices(table, [("score", "descending"), ("uid", "ascending")]).to_numpy()


def block_of(ids: np.ndarray, blocks: int) -> np.ndarray:
    """The block of a split cluster each row falls in: a hash of its id, so every task agrees without sorting the cluster."""
    return (mix64(ids.astype(np.uint64)) % np.uint64(blocks)).astype(np.int64)


def vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A float16 embedding column as (n, D) float32, for the matmuls."""
    return embedding_matrix(column).astype(np.float32)
