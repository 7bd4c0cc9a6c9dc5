"""Passes 3-6 of the dedup: candidate near pairs from permuted hash tables (Manku, Jain & Das Sarma, WWW 2007).

3. signatures (one task per group of shards): the survivors' pHash, colour thumbnail and detail
   key (a hash of the detail thumbnail) read from the scans, to buckets of a hash of all three
   (`by_image/`). Thumbnails (192 bytes a row) are read once here rather than carried through
   the sha256 shuffle (most rows only pass them on).
4. collapse (per bucket): rows with identical (pHash, thumbnail, detail key) become one
   representative, the first in uid order (`representatives/`); the others are its members
   (`members/`; `walk.member_targets` says why their result follows from the representative's).
   A pile of identical images (a placeholder) is one representative.
5. table_partition (per representative bucket): the 64 bits are cut into k blocks; for each of
   the C(k, d) choices of d blocks a table keys on the other k-d blocks, because two hashes within
   d bits agree exactly on at least k-d blocks (`hash_blocks`). The tables whose key starts with
   block j share one partition of the representatives by block j's value, in ranges sized from
   the collapse's histograms (`table_entries/`).
6. tables (per leading block and key range): each table's entries sorted by key, only the
   entries of equal-key runs compared, vectorised (XOR + popcount), keeping pairs within d bits
   whose quarter colour sums do not already rule out `max_color` (a lower bound of the colour
   distance, so no pair that could be confirmed is lost) (`candidates/`).

What is left quadratic is a run of *distinct* hashes that share a table key, e.g. 10,000
recoloured copies of one picture (same pHash, other thumbnails): their pairs are all compared.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dallekit.images import THUMB_BYTES
from dallekit.io import write_table_atomic
from dallekit.pipeline.dedup.columns import (
    ID_SCHEMA,
    INTERMEDIATE_PARQUET,
    PAIR_SCHEMA,
    SCAN_ROW_SCHEMA,
    SIGNATURE_SCHEMA,
    SUMMARY_TYPE,
    TABLE_ENTRY_SCHEMA,
    byte_matrix,
    fixed_binary_array,
    fold_words,
    numpy_columns,
    read_parquet,
    shuffle,
    splitmix64,
    take_table_rows,
)
from dallekit.pipeline.dedup.state import DedupRun, consumer_items
from dallekit.pipeline.hash_blocks import equal_key_pairs, histograms, key_ranges, lead_bits, sorted_keys, tables_led_by
from dallekit.pipeline.passes import ShuffleWriter, parts_for_consumers, read_shuffle_parts


def signatures_task(item: tuple[int, dict], state_dir: str, work_dir: str, names: list[str], groups: list[list[int]],
                    buckets: int) -> dict:
    """Pass signatures, one task per group of shards: the survivors' pHash, thumbnail and detail key from the scans, to their buckets."""
    g, inputs = item
    refs = read_shuffle_parts(inputs["survivors"], SCAN_ROW_SCHEMA)
    refs = refs.take(pc.sort_indices(refs, [("shard", "ascending"), ("row", "ascending")]))
    shard, row = numpy_columns(refs, "shard", "row")
    n = len(row)
    ph, thumbs, valid = np.zeros(n, np.uint64), np.empty((n, THUMB_BYTES), np.uint8), np.ones(n, bool)
    keys = np.zeros(n, np.uint64)  # the scan's hash of each detail thumbnail (0 in scans without one): 3 KB a row never travels
    for s in groups[g]:  # each shard's rows gathered straight into place
        lo, hi = np.searchsorted(shard, s, "left"), np.searchsorted(shard, s, "right")
        if lo < hi:
            scan = read_parquet(f"{work_dir}/scan/{names[s]}.parquet")
            ph[lo:hi] = pc.fill_null(scan["phash"], 0).to_numpy()[row[lo:hi]]
            np.take(byte_matrix(scan["color_thumb"]), row[lo:hi], axis=0, out=thumbs[lo:hi])
            if "detail_key" in scan.column_names:
                keys[lo:hi] = pc.fill_null(scan["detail_key"], 0).to_numpy()[row[lo:hi]]
            valid[lo:hi] = pc.is_valid(scan["phash"]).to_numpy(zero_copy_only=False)[row[lo:hi]]  # no pHash: nothing to compare
    rows = pa.table({"uid": refs["uid"], "shard": refs["shard"], "row": row, "phash": ph, "color_thumb": fixed_binary_array(thumbs),
                     "detail_key": keys}, schema=SIGNATURE_SCHEMA)
    if not valid.all():
        keep = np.flatnonzero(valid)
        rows, ph, thumbs, keys = take_table_rows(rows, keep), ph[keep], thumbs[keep], keys[keep]
    bucket = fold_words(splitmix64(ph ^ splitmix64(keys)), thumbs) % np.uint64(buckets)  # identical images land in one collapse bucket
    return {"parts": {"by_image": shuffle(rows, bucket, f"{state_dir}/by_image/{g}.arrow")}}


def collapse_task(item: tuple[int, dict], state_dir: str, k: int, distance: int) -> dict:
    """Pass collapse, one task per bucket: identical (pHash, thumbnail, detail key) rows to one representative, the first in uid order."""
    p, inputs = item
    rows = read_shuffle_parts(inputs["by_image"], SIGNATURE_SCHEMA)
    rows = take_table_rows(rows, pc.sort_indices(rows, [(name, "ascending") for name in ("phash", "color_thumb", "detail_key", "uid")]))
    ph, keys = numpy_columns(rows, "phash", "detail_key")
    words = np.concatenate([byte_matrix(rows["color_thumb"]).view(np.uint64), keys[:, None]], axis=1)
    new = np.ones(len(ph), bool)
    new[1:] = (ph[1:] != ph[:-1]) | (words[1:] != words[:-1]).any(axis=1)
    local = np.cumsum(new) - 1
    reps = take_table_rows(rows, np.flatnonzero(new))  # with its colour summary, computed once here where the thumbnails are read
    summary = color_summary(byte_matrix(reps["color_thumb"]))
    reps = reps.append_column("summary", pa.FixedSizeBinaryArray.from_buffers(SUMMARY_TYPE, len(summary), [None, pa.py_buffer(summary)]))
    write_table_atomic(reps, f"{state_dir}/representatives/{p}.parquet", **INTERMEDIATE_PARQUET)
    member = pa.array(~new)
    members = pa.table({"id": (p << 32) + local[~new], "uid": rows["uid"].filter(member), "shard": rows["shard"].filter(member)},
                       schema=ID_SCHEMA)
    write_table_atomic(members, f"{state_dir}/members/{p}.parquet", **INTERMEDIATE_PARQUET)
    return {"reps": int(new.sum()), "members": int((~new).sum()), "hist": histograms(ph[new], k, distance)}


def color_summary(thumbs: np.ndarray) -> np.ndarray:
    """(n, 12) uint16 sums of each 4x4-pixel quarter of an 8x8 RGB thumbnail, per channel.

    `color_distance` is at least sum(|sums_a - sums_b|) / 192 (the triangle inequality per
    quarter), so a pair whose summaries are further apart than the limit cannot be confirmed
    and need not travel with its two thumbnails to the confirm passes.
    """
    quarters = thumbs.reshape(-1, 2, 4, 2, 4, 3)  # (n, quarter row, pixel row, quarter column, pixel column, channel)
    rows = quarters[:, :, 0].astype(np.uint16)
    for i in range(1, 4):  # adding slices in place: 7x faster than numpy's sum over two axes of this view
        rows += quarters[:, :, i]
    sums = rows[:, :, :, 0].copy()
    for j in range(1, 4):
        sums += rows[:, :, :, j]
    return sums.reshape(-1, 12)


def color_distance_bound(summary_a: np.ndarray, summary_b: np.ndarray) -> np.ndarray:
    """A lower bound of color_distance from two (n, 12) summaries."""
    return np.abs(summary_a.astype(np.int32) - summary_b.astype(np.int32)).sum(axis=1) / THUMB_BYTES


def summary_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A SUMMARY_TYPE column as an (n, 12) uint16 array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 12), np.uint16)
    return np.frombuffer(arr.buffers()[1], np.uint16)[arr.offset * 12 : (arr.offset + len(arr)) * 12].reshape(-1, 12)


def partition_tables_task(item: tuple[int, dict], state_dir: str, k: int, bounds: dict[int, list[int]]) -> dict:
    """Pass table_partition, one task per representative bucket: each representative to the table range of every leading block."""
    p = item[0]
    reps = read_parquet(f"{state_dir}/representatives/{p}.parquet", ["phash", "summary"])
    (ph,) = numpy_columns(reps, "phash")
    table = pa.table({"phash": ph, "id": (p << 32) + np.arange(len(ph), dtype=np.int64), "summary": reps["summary"]},
                     schema=TABLE_ENTRY_SCHEMA)
    out = ShuffleWriter(f"{state_dir}/table_entries/{p}.arrow")
    for lead, starts in bounds.items():
        key_range = np.searchsorted(np.asarray(starts), lead_bits(ph, k, lead), side="right") - 1
        out.split(table, key_range, key=lambda r, lead=lead: f"{lead}-{r}", take=take_table_rows)
    return {"parts": {"table_entries": out.close()}}


def compare_tables_task(item: tuple[str, dict], state_dir: str, k: int, distance: int, max_color: float | None) -> dict:
    """Pass tables, one task per (leading block, key range): sort each table led by the block, compare within equal keys.

    Pairs whose colour summaries already rule out `max_color` are dropped here.
    """
    key, inputs = item
    lead, key_range = (int(x) for x in key.split("-"))
    entries = read_shuffle_parts(inputs["table_entries"], TABLE_ENTRY_SCHEMA)
    ph, ids = numpy_columns(entries, "phash", "id")
    summary = summary_matrix(entries["summary"])
    found, compared = [], 0
    for blocks in tables_led_by(k, distance, lead):
        keys, order = sorted_keys(ph, k, blocks)
        i, j, bits, n = equal_key_pairs(keys, ph[order], distance)
        if max_color is not None and len(i):
            near = color_distance_bound(summary[order[i]], summary[order[j]]) <= max_color
            i, j, bits = i[near], j[near], bits[near]
        a, b = ids[order[i]], ids[order[j]]
        found.append((np.minimum(a, b), np.maximum(a, b), bits.astype(np.int8)))
        compared += n
    a, b, bits = (np.concatenate(x) for x in zip(*found)) if found else (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.int8),)
    pairs = pa.table({"a": a, "b": b, "bits": bits}, schema=PAIR_SCHEMA)
    parts = shuffle(pairs, a >> 32, f"{state_dir}/candidates/{lead}-{key_range}.arrow")
    return {"compared": compared, "candidates": len(a), "parts": {"candidates": parts}}


def candidate_passes(run: DedupRun, exact: list[dict], buckets: int, k: int, distance: int,
                     max_color: float | None) -> tuple[dict, list[dict]]:
    """Passes signatures, collapse, table_partition and tables (k blocks): the stats, and the tables' results (candidate pairs)."""
    signatures = run.run("signatures", signatures_task, consumer_items(range(len(run.groups)), survivors=parts_for_consumers(exact, "survivors")),
                         state_dir=run.state_dir, work_dir=run.work_dir, names=run.names, groups=run.groups, buckets=buckets)
    run.drop("exact", "survivors")
    each = range(buckets)
    collapsed = run.run("collapse", collapse_task, consumer_items(each, by_image=parts_for_consumers(signatures, "by_image")),
                        state_dir=run.state_dir, k=k, distance=distance)
    run.drop("signatures", "by_image")
    hist = [np.sum([r["hist"][j] for r in collapsed], axis=0) for j in range(distance + 1)]
    bounds = {j: key_ranges(h, run.rows_per_task) for j, h in enumerate(hist)}
    entries = run.run("table_partition", partition_tables_task, consumer_items(each), state_dir=run.state_dir, k=k, bounds=bounds)
    table_keys = [f"{j}-{r}" for j, starts in bounds.items() for r in range(len(starts))]
    tables = run.run("tables", compare_tables_task, consumer_items(table_keys, table_entries=parts_for_consumers(entries, "table_entries")),
                     state_dir=run.state_dir, k=k, distance=distance, max_color=max_color)
    run.drop("table_partition", "table_entries")
    stats = {"representatives": sum(r["reps"] for r in collapsed), "blocks": k, "tables": math.comb(k, distance),
             "table_tasks": len(tables), "compared_pairs": sum(r["compared"] for r in tables)}
    return stats, tables
