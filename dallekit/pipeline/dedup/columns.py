"""What the dedup passes pass each other: the schemas of their shuffles, and the numpy <-> Arrow helpers every pass uses.

A representative's id is `bucket << 32 | its index in representatives/<bucket>.parquet`: the
bucket says which task holds it, the low 32 bits (LOCAL_ID_MASK) where.
"""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.images import THUMB_BYTES
from dallekit.pipeline.passes import write_shuffle

LOCAL_ID_MASK = (1 << 32) - 1  # a representative id's index within its bucket
REASON_EXACT, REASON_NEAR = "duplicate_image", "near_duplicate_image"

THUMB_TYPE = pa.binary(THUMB_BYTES)
SUMMARY_TYPE = pa.binary(24)  # a thumbnail's 12 sums (2x2 regions of 4x4 pixels, 3 channels) as uint16: see candidates.color_summary
UID_SCHEMA = pa.schema([("uid", pa.string()), ("shard", pa.int32())])
SCAN_ROW_SCHEMA = pa.schema([("uid", pa.string()), ("shard", pa.int32()), ("row", pa.int32())])  # a surviving row of a scan shard
SHA_SCHEMA = SCAN_ROW_SCHEMA.append(pa.field("sha256", pa.string()))
SIGNATURE_SCHEMA = SCAN_ROW_SCHEMA.append(pa.field("phash", pa.uint64())).append(pa.field("color_thumb", THUMB_TYPE)).append(
    pa.field("detail_key", pa.uint64()))  # detail_key: a hash of the detail thumbnail
ID_SCHEMA = pa.schema([("id", pa.int64()), ("uid", pa.string()), ("shard", pa.int32())])  # members (id: their representative) and nodes
TABLE_ENTRY_SCHEMA = pa.schema([("phash", pa.uint64()), ("id", pa.int64()), ("summary", SUMMARY_TYPE)])
PAIR_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("bits", pa.int8())])  # two representative ids and their Hamming distance
PAIR_THUMB_SCHEMA = PAIR_SCHEMA.append(pa.field("thumb_a", THUMB_TYPE)).append(pa.field("shard_a", pa.int32())).append(
    pa.field("row_a", pa.int32()))
EDGE_SCHEMA = pa.schema([("u", pa.int64()), ("v", pa.int64())])
MARK_SCHEMA = pa.schema([("uid", pa.string()), ("shard", pa.int32()), ("reason", pa.string()),
                         ("duplicate_of", pa.string()), ("duplicate_distance", pa.int32())])
SHARD_MARK_COLUMNS = ["uid", "reason", "duplicate_of", "duplicate_distance"]  # the columns of each shard's dups file
# Intermediate files are read once, soon: hashes and thumbnails do not compress, dictionaries do not pay.
INTERMEDIATE_PARQUET = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit (bucket keys, uids in benchmarks)."""
    x = np.asarray(x).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def fold_words(h: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Mix the rows of a (n, 8m) uint8 array into the uint64 hashes h, one word at a time."""
    words = np.ascontiguousarray(data).view(np.uint64)
    for c in range(words.shape[1]):
        h = splitmix64(h ^ words[:, c])
    return h


def string_bucket_hash(column: pa.ChunkedArray) -> np.ndarray:
    """A deterministic uint64 per string from its length and first and last 16 bytes: a bucket key, never an identity."""
    arr = pc.cast(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column, pa.large_binary())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    start, end = offsets[:-1], offsets[1:]
    width = int(end[0] - start[0]) if n else 0
    if 16 <= width and np.all(end - start == width):  # one length (sha256 hex, most uids): a zero-copy (n, width) view
        rows = data[offsets[0] : offsets[0] + n * width].reshape(n, width)
        return fold_words(splitmix64(end - start), np.concatenate([rows[:, :16], rows[:, -16:]], axis=1))
    i = np.arange(16)
    head_at, tail_at = start[:, None] + i, end[:, None] - 16 + i
    pad = np.r_[data, np.zeros(1, np.uint8)]  # index len(data): a zero for the bytes a short string lacks
    head = pad[np.where(head_at < end[:, None], head_at, len(data))]
    tail = pad[np.where(tail_at >= start[:, None], tail_at, len(data))]
    return fold_words(splitmix64(end - start), np.concatenate([head, tail], axis=1))


def byte_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_binary(w) column (colour or detail thumbnails) as an (n, w) uint8 array (nulls as zeros)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.byte_width
    if len(arr) == 0:
        return np.zeros((0, width), np.uint8)
    raw = np.frombuffer(arr.buffers()[1], np.uint8)[arr.offset * width : (arr.offset + len(arr)) * width]
    out = raw.reshape(len(arr), width)
    if arr.null_count:
        out = out.copy()
        out[pc.is_null(arr).to_numpy(zero_copy_only=False)] = 0
    return out


def fixed_binary_array(rows: np.ndarray) -> pa.Array:
    """An (n, w) uint8 array as a fixed_size_binary(w) Arrow array."""
    width = rows.shape[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows), [None, pa.py_buffer(np.ascontiguousarray(rows))])


def numpy_columns(table: pa.Table, *names: str) -> list[np.ndarray]:
    """Numeric columns as numpy arrays (empty ones too)."""
    return [table[name].to_numpy() if table.num_rows else np.zeros(0, table.schema.field(name).type.to_pandas_dtype())
            for name in names]


def run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array."""
    if not len(sorted_keys):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns)


def take_table_rows(table: pa.Table, indices: Any) -> pa.Table:
    """Rows `indices` of a table; thumbnail columns through numpy (Arrow's take of fixed-size binary is 3x slower)."""
    indices = np.asarray(indices, np.int64)
    columns = [fixed_binary_array(byte_matrix(table[name])[indices]) if table.schema.field(name).type == THUMB_TYPE
               else table[name].take(pa.array(indices)) for name in table.column_names]
    return pa.Table.from_arrays(columns, schema=table.schema)


def shuffle(table: pa.Table, consumer_of_row: np.ndarray, path: str) -> dict[str, list]:
    """The engine's shuffle of `table` to consumer tasks, one file at `path`, with the thumbnail-aware take; its index."""
    return write_shuffle(table, consumer_of_row, path, take=take_table_rows)


def mark_table(rows: pa.Table, reason: str, of: pa.Array | pa.ChunkedArray, distance: np.ndarray) -> pa.Table:
    """Marks for `rows` (with uid and shard): the reason, the uid they duplicate and the distance."""
    return pa.table({"uid": rows["uid"], "shard": rows["shard"], "reason": pa.array([reason] * rows.num_rows, pa.string()),
                     "duplicate_of": of, "duplicate_distance": pa.array(np.asarray(distance, np.int32))}, schema=MARK_SCHEMA)


def shuffle_marks(marks: pa.Table, state_dir: str, group_of: list[int], name: str) -> dict[str, list]:
    """Marks to the final task of their shard's group; the index of the file written (marks/<name>.arrow)."""
    groups = np.asarray(group_of, np.int64)[numpy_columns(marks, "shard")[0]]
    return shuffle(marks, groups, f"{state_dir}/marks/{name}.arrow")
