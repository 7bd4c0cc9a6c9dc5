"""Repeated URLs across a stage's whole input (ingest, adopt): the first row of a URL in input order keeps it.

Each row of the input has a position `_order` = block << 32 | row in its block. The passes run in
the stage's scratch folder (`passes.work_dir`), each resumable by its marks (`passes.run_pass`):

1. scan, the stage's own (one task per block, or group of small blocks): besides its block's
   rows it writes the (url, uid, _order, url_hash) of the rows that take part with
   `write_url_parts`: one file `urls/<task>.arrows`, an Arrow stream per bucket (url_hash modulo
   the buckets; `hashing.string_hash`, vectorised over all the URL's bytes).
2. `url-dedup`, one task per bucket: its parts from every scan file by byte range; the rows whose
   URL an earlier row has, with the uid of that first row (rows sorted by url_hash, and each
   repeat's URL compared with its first row's: two URLs of one hash are told apart by value),
   to `dups/h-K.arrows`, an Arrow stream per regroup task.
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
from dallekit.pipeline.hashing import string_hash
from dallekit.pipeline.passes import ShuffleWriter, parts_for_consumers, read_shuffle_parts, run_pass, work_dir

URLS = pa.schema([("url", pa.string()), ("uid", pa.string()), ("_order", pa.int64()), ("url_hash", pa.uint64())])  # a scan's rows
DUPS = pa.schema([("_order", pa.int64()), ("duplicate_of", pa.string())])  # a repeat and the uid of its URL's first row
ROW_GROUP = 10000  # rows per row group of block_dups/: a shard task reads only the groups of its rows
BLOCK_SHIFT = 32  # _order = block << BLOCK_SHIFT | row


def orders(block: int, rows: int) -> np.ndarray:
    """The `_order` of a block's rows."""
    return (np.int64(block) << BLOCK_SHIFT) + np.arange(rows, dtype=np.int64)


def _add_runs(out: ShuffleWriter, table: pa.Table, consumers: np.ndarray) -> None:
    """The rows of `table` to the consumers `consumers` (non-decreasing, one per row): each consumer's rows one slice, no copy."""
    starts = np.flatnonzero(np.r_[True, consumers[1:] != consumers[:-1]]) if len(consumers) else np.zeros(0, np.int64)
    for lo, hi in zip(starts.tolist(), [*starts[1:].tolist(), len(consumers)]):
        out.add(int(consumers[lo]), table.slice(lo, hi - lo))


def write_url_parts(table: pa.Table, n_buckets: int, scratch: str, task: str, keep: pa.ChunkedArray | None = None) -> dict[str, list]:
    """A scan task's rows (those where `keep` is true), (url, uid, _order, url_hash) in input order, as one file of a stream per
    bucket (url_hash modulo n_buckets); the index its result carries as parts["urls"]."""
    table = table.select(URLS.names[:3]).filter(keep) if keep is not None else table.select(URLS.names[:3])
    hashes = string_hash(table.column("url"))
    table = table.append_column("url_hash", pa.array(hashes)).cast(URLS)
    out = ShuffleWriter(f"{scratch}/urls/{task}.arrows")
    if n_buckets == 1:
        out.add(0, table)
    else:  # the rows grouped by bucket, in input order within each
        bucket = (hashes % np.uint64(n_buckets)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")
        _add_runs(out, table.take(pa.array(order)), bucket[order])
    return out.close()


def repeats(rows: pa.Table) -> pa.Table:
    """(_order, duplicate_of) of the rows (in input order) whose URL an earlier row has, with that first row's uid."""
    if not rows.num_rows:
        return DUPS.empty_table()
    later, first = _repeats_by_key(rows.column("url_hash").to_numpy())
    urls = rows.column("url")
    if pc.all(pc.equal(urls.take(pa.array(later)), urls.take(pa.array(first)))).as_py() is False:  # two URLs of one hash
        later, first = _repeats_by_key(pc.dictionary_encode(urls.combine_chunks()).indices.to_numpy())  # by value: exact
    return pa.table({"_order": rows.column("_order").take(pa.array(later)), "duplicate_of": rows.column("uid").take(pa.array(first))},
                    schema=DUPS)


def _repeats_by_key(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(later, first): the rows whose key an earlier row has, in row order, and that earlier row (the key's first) for each."""
    order = np.argsort(keys, kind="stable")  # stable: a key's rows stay in row order
    starts = np.r_[True, keys[order][1:] != keys[order][:-1]]
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))]
    later, first = order[~starts], first[~starts]
    back = np.argsort(later)
    return later[back], first[back]


def dedup_bucket(item: tuple[int, list[list]], scratch: str, group_of_block: list[int]) -> dict:
    """Pass 2, one task per bucket: the repeats of its URLs, as a stream per regroup task in `dups/h-K.arrows`."""
    bucket, refs = item
    rows = read_shuffle_parts(refs, URLS)
    order = rows.column("_order").to_numpy()
    if len(order) > 1 and not np.all(order[1:] > order[:-1]):  # parts come in scan order; a grouped scan may interleave
        rows = rows.take(pa.array(np.argsort(order, kind="stable")))
    dups = repeats(rows)
    group = np.asarray(group_of_block, np.int64)[dups.column("_order").to_numpy() >> BLOCK_SHIFT]
    out = ShuffleWriter(f"{scratch}/dups/h-{bucket:04d}.arrows")
    if np.all(group[1:] >= group[:-1]):  # groups of consecutive blocks (ingest's, adopt's): each a slice of the sorted rows
        _add_runs(out, dups, group)
    else:
        out.split(dups, group)
    return {"repeats": dups.num_rows, "parts": {"dups": out.close()}}


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
