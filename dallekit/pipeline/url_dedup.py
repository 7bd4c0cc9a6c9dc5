"""Repeated URLs across a stage's whole input (ingest, adopt): the first row of a URL in input order keeps it.

Each row of the input has a position `_order` = block << 32 | row in its block. The passes run in
the stage's scratch folder (`passes.work_dir`), each resumable by its marks (`passes.run_pass`):

1. scan, the stage's own (one task per block, or group of small blocks): besides its block's
   rows it writes the (url, uid, _order) of the rows that take part with `write_url_parts`: one
   file `urls/<task>.arrows`, an Arrow stream per bucket (a hash of the URL, vectorised).
2. `url-dedup`, one task per bucket: its parts from every scan file by byte range; the rows whose
   URL an earlier row has (found by Arrow's hash table: exact, no hash collision can merge two
   URLs) with the uid of that first row, to `dups/h-K.arrows`, an Arrow stream per regroup task.
3. `url-regroup`, one task per group of blocks: its parts from every bucket, sorted by `_order`,
   written per block to `block_dups/b-N.parquet` (`_order`, `duplicate_of`). A shard task then
   opens one file per block it reads, not one per bucket (blocks x buckets grows as N^2).

Producers write one file per task, not one per task and bucket, so a pass writes P files.
"""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.io import write_table_atomic
from dallekit.pipeline.hashing import buckets_of
from dallekit.pipeline.passes import parts_for_consumers, read_shuffle_parts, run_pass, work_dir, write_shuffle

URLS = pa.schema([("url", pa.string()), ("uid", pa.string()), ("_order", pa.int64())])  # a scan's rows that take part
DUPS = pa.schema([("_order", pa.int64()), ("duplicate_of", pa.string())])  # a repeat and the uid of its URL's first row
ROW_GROUP = 10000  # rows per row group of block_dups/: a shard task reads only the groups of its rows
BLOCK_SHIFT = 32  # _order = block << BLOCK_SHIFT | row


def orders(block: int, rows: int) -> np.ndarray:
    """The `_order` of a block's rows."""
    return (np.int64(block) << BLOCK_SHIFT) + np.arange(rows, dtype=np.int64)


def write_url_parts(table: pa.Table, n_buckets: int, scratch: str, task: str) -> dict[str, list]:
    """A scan task's (url, uid, _order) rows, in input order, as one file of a stream per bucket; the index its result carries as parts["urls"]."""
    table = table.select(URLS.names).cast(URLS)
    return write_shuffle(table, buckets_of(table.column("url"), n_buckets), f"{scratch}/urls/{task}.arrows")


def repeats(rows: pa.Table) -> pa.Table:
    """(_order, duplicate_of) of the rows (in input order) whose URL an earlier row has, with that first row's uid."""
    if not rows.num_rows:
        return DUPS.empty_table()
    codes = pc.dictionary_encode(rows.column("url").combine_chunks()).indices.to_numpy()  # codes in order of first sight
    seen = np.maximum.accumulate(codes)
    first = np.r_[True, codes[1:] > seen[:-1]]  # a row whose code is new: its URL's first row
    first_row = np.flatnonzero(first)  # indexed by code
    later = np.flatnonzero(~first)
    duplicate_of = rows.column("uid").take(pa.array(first_row[codes[later]]))
    return pa.table({"_order": rows.column("_order").take(pa.array(later)), "duplicate_of": duplicate_of}, schema=DUPS)


def dedup_bucket(item: tuple[int, list[list]], scratch: str, group_of_block: list[int]) -> dict:
    """Pass 2, one task per bucket: the repeats of its URLs, as a stream per regroup task in `dups/h-K.arrows`."""
    bucket, refs = item
    rows = read_shuffle_parts(refs, URLS)
    order = rows.column("_order").to_numpy()
    if len(order) > 1 and not np.all(order[1:] > order[:-1]):  # parts come in scan order; a grouped scan may interleave
        rows = rows.take(pa.array(np.argsort(order, kind="stable")))
    dups = repeats(rows)
    group = np.asarray(group_of_block, np.int64)[dups.column("_order").to_numpy() >> BLOCK_SHIFT]
    index = write_shuffle(dups, group, f"{scratch}/dups/h-{bucket:04d}.arrows")
    return {"repeats": dups.num_rows, "parts": {"dups": index}}


def block_dups_path(scratch: str, block: int) -> str:
    """The repeats of one block, sorted by `_order`."""
    return f"{scratch}/block_dups/b-{block:06d}.parquet"


def regroup(item: tuple[list[int], list[list]], scratch: str) -> dict:
    """Pass 3, one task per group of blocks: its repeats from every bucket, one file per block (written even when empty)."""
    blocks, refs = item
    dups = read_shuffle_parts(refs, DUPS).sort_by("_order")
    owner = dups.column("_order").to_numpy() >> BLOCK_SHIFT
    for block in blocks:
        lo, hi = np.searchsorted(owner, [block, block + 1])
        write_table_atomic(dups.slice(lo, hi - lo), block_dups_path(scratch, block), row_group_size=ROW_GROUP)
    return {"repeats": dups.num_rows}


def read_block_dups(scratch: str, block: int, start: int, stop: int) -> pa.Table:
    """The repeats among rows [start, stop) of a block, sorted by `_order`."""
    lo = (block << BLOCK_SHIFT) + start
    fs, path = fsspec.core.url_to_fs(block_dups_path(scratch, block))
    with fs.open(path, "rb") as f:
        return pq.read_table(f, filters=[("_order", ">=", lo), ("_order", "<", lo + stop - start)])


def find_repeats(client, output_dir: str, scanned: list[dict], n_buckets: int, groups: list[list[int]], stage: str) -> int:
    """Passes 2 and 3 after a stage's scan (`scanned`: its tasks' results with parts["urls"], in block order); the repeats found."""
    scratch = work_dir(output_dir)
    urls = parts_for_consumers(scanned, "urls")
    group_of_block = [0] * (max((b for g in groups for b in g), default=-1) + 1)
    for g, blocks in enumerate(groups):
        for b in blocks:
            group_of_block[b] = g
    buckets = {f"h-{k:04d}": (k, urls.get(str(k), [])) for k in range(n_buckets)}
    deduped = run_pass(client, scratch, "url-dedup", dedup_bucket, buckets, desc=f"{stage} dedup", unit="bucket",
                       scratch=scratch, group_of_block=group_of_block)
    dups = parts_for_consumers(deduped.values(), "dups")
    items = {f"g-{g:06d}": (blocks, dups.get(str(g), [])) for g, blocks in enumerate(groups)}
    run_pass(client, scratch, "url-regroup", regroup, items, desc=f"{stage} regroup", unit="group", scratch=scratch)
    return sum(r["repeats"] for r in deduped.values())
