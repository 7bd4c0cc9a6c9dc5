"""Passes 7-8 of the dedup: candidate pairs confirmed by colour, then by detail.

7. pair_thumbnails (one task per bucket of a pair's first end): candidate pairs deduplicated
   (several tables find the same pair) and joined with the first end's colour thumbnail and scan
   row, to the bucket of the second end (`pairs/`).
8. confirm (one task per bucket of the second end): `color_distance` and then `detail_distance`
   (about 0.1 ms a pair) confirm each pair. Detail thumbnails (3 KB) never travel: a pair that
   colour confirmed reads its two from the scans' memory-mapped `.detail.arrow`; a pair where
   either end has none (a scan written without them) is confirmed by colour alone. The
   confirmed edges go to the walk (`confirmed_edges/`), both directions of each to the first
   round of the components (`components/0/`).
"""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa

from dallekit.images import DETAIL_BYTES, THUMB_BYTES, color_distance, detail_distance
from dallekit.io import take_rows
from dallekit.pipeline.dedup.columns import (
    LOCAL_ID_MASK,
    PAIR_SCHEMA,
    PAIR_THUMB_SCHEMA,
    byte_matrix,
    fixed_binary_array,
    numpy_columns,
    read_parquet,
    shuffle,
)
from dallekit.pipeline.dedup.components import shuffle_edges
from dallekit.pipeline.dedup.state import DedupRun, consumer_items
from dallekit.pipeline.passes import parts_for_consumers, read_shuffle_parts


def representative_thumbnails(state_dir: str, p: int) -> np.ndarray:
    """The colour thumbnails of bucket p's representatives, indexed by their local id."""
    return byte_matrix(read_parquet(f"{state_dir}/representatives/{p}.parquet", ["color_thumb"])["color_thumb"])


def detail_thumbnails(work_dir: str, names: list[str], shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """The detail thumbnails of scan rows (shard, row), (n, 3072); zeros where a scan has none (then colour alone confirms)."""
    out = np.zeros((len(row), DETAIL_BYTES), np.uint8)
    for s, path in ((s, f"{work_dir}/scan/{names[s]}.detail.arrow") for s in np.unique(shard).tolist()):
        if fsspec.core.url_to_fs(path)[0].exists(fsspec.core.url_to_fs(path)[1]):
            out[shard == s] = take_rows(path, row[shard == s])
    return out


def pair_thumbnails_task(item: tuple[int, dict], state_dir: str) -> dict:
    """Pass pair_thumbnails, one task per bucket of the first end: each candidate pair once, with its first thumbnail, to the second end's bucket."""
    p, inputs = item
    a, b, bits = numpy_columns(read_shuffle_parts(inputs["candidates"], PAIR_SCHEMA), "a", "b", "bits")
    order = np.lexsort((b, a))
    a, b, bits = a[order], b[order], bits[order]
    once = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    a, b, bits = a[once], b[once], bits[once]
    reps = read_parquet(f"{state_dir}/representatives/{p}.parquet", ["color_thumb", "shard", "row"])
    thumbs = byte_matrix(reps["color_thumb"])[a & LOCAL_ID_MASK] if len(a) else np.zeros((0, THUMB_BYTES), np.uint8)
    shard, row = (x[a & LOCAL_ID_MASK] for x in numpy_columns(reps, "shard", "row"))
    pairs = pa.table({"a": a, "b": b, "bits": bits, "thumb_a": fixed_binary_array(thumbs), "shard_a": shard, "row_a": row},
                     schema=PAIR_THUMB_SCHEMA)
    return {"pairs": len(a), "parts": {"pairs": shuffle(pairs, b >> 32, f"{state_dir}/pairs/{p}.arrow")}}


def confirm_task(item: tuple[int, dict], state_dir: str, max_color: float | None, max_detail: float | None, work_dir: str,
                 names: list[str]) -> dict:
    """Pass confirm, one task per bucket of the second end: colour_distance, then detail_distance confirm each pair; edges for the walk and the components."""
    q, inputs = item
    pairs = read_shuffle_parts(inputs["pairs"], PAIR_THUMB_SCHEMA)
    a, b, bits = numpy_columns(pairs, "a", "b", "bits")
    agree = np.ones(len(a), bool)
    if max_color is not None and len(a):
        agree = color_distance(byte_matrix(pairs["thumb_a"]), representative_thumbnails(state_dir, q)[b & LOCAL_ID_MASK]) <= max_color
    if max_detail is not None and agree.any():
        at = np.flatnonzero(agree)
        reps = read_parquet(f"{state_dir}/representatives/{q}.parquet", ["shard", "row"])
        detail_a = detail_thumbnails(work_dir, names, *(x[at] for x in numpy_columns(pairs, "shard_a", "row_a")))
        detail_b = detail_thumbnails(work_dir, names, *(x[b[at] & LOCAL_ID_MASK] for x in numpy_columns(reps, "shard", "row")))
        missing = ~detail_a.any(axis=1) | ~detail_b.any(axis=1)
        agree[at] = missing | (detail_distance(detail_a, detail_b, enough=max_detail) <= max_detail)
    a, b, bits = a[agree], b[agree], bits[agree]
    edges = pa.table({"a": a, "b": b, "bits": bits}, schema=PAIR_SCHEMA)
    parts = {"confirmed_edges": shuffle(edges, a >> 32, f"{state_dir}/confirmed_edges/{q}.arrow"),
             "components": shuffle_edges(np.r_[a, b], np.r_[b, a], f"{state_dir}/components/0", q)}
    return {"edges": len(a), "parts": parts}


def confirm_passes(run: DedupRun, tables: list[dict], buckets: int, max_color: float | None,
                   max_detail: float | None) -> list[dict]:
    """Passes pair_thumbnails and confirm: the confirm pass's results (edges for the walk and the components)."""
    each = range(buckets)
    paired = run.run("pair_thumbnails", pair_thumbnails_task, consumer_items(each, candidates=parts_for_consumers(tables, "candidates")),
                     state_dir=run.state_dir)
    run.drop("tables", "candidates")
    confirmed = run.run("confirm", confirm_task, consumer_items(each, pairs=parts_for_consumers(paired, "pairs")),
                        state_dir=run.state_dir, max_color=max_color, max_detail=max_detail, work_dir=run.work_dir, names=run.names)
    run.drop("pair_thumbnails", "pairs")
    return confirmed
