"""Distributed exact and near-duplicate marking for `dallekit clean`: no task, and not the driver, holds the dataset.

The result is the one of the sequential walk it replaces: the rows that survived the scan, in uid order; a row whose sha256 equals
an earlier surviving row's is a `duplicate_image` of the first such row; otherwise a row is a `near_duplicate_image` when an
earlier *kept* row (kept = not rejected as either kind) has a pHash within `distance` bits, a colour thumbnail within `max_color`
and a detail thumbnail within `max_detail` (`detail_distance`), and its `duplicate_of` is the nearest such kept row (fewest bits,
then smallest uid).

Passes, each a set of Dask tasks that write their outputs atomically under `_work/dedup/` and then a marker
(`_done/<pass>/<task>.json`, holding the task's small result), so that a rerun after a killed worker or driver skips every
finished task and writes the same files. A task writes one file per output kind, an Arrow IPC stream per consumer task back to
back, and its marker indexes them by byte range: a pass of P producers and C consumers writes P files, not P * C (at 16M rows, 32
x 160 small files a pass cost more than the pass's work).

1. split (per group of scan shards): every uid to a uid bucket, every surviving row to a sha256 bucket (hash partitioning).
2. exact (per bucket): repeated uids (BadInputError, as `check_unique_uids`), then the sha256 repeats: the first in uid order
   keeps, the others are marked. Survivors go on to buckets of a hash of (pHash, thumbnail, detail key: a hash of the detail
   thumbnail), read from the scans (prepare, per group).
3. collapse (per bucket): rows with identical (pHash, thumbnail, detail key) become one representative, the first in uid order;
   the others are its members (see `_member_targets` for why their result follows from the representative's neighbours).
4. tables (Manku, Jain & Das Sarma, WWW 2007): the 64 bits are cut into k blocks; for each of the C(k, d) choices of d blocks a
   table keys on the other k-d blocks, because two hashes within d bits agree exactly on at least k-d blocks. The tables whose key
   starts with block j share one partition of the representatives by block j's value (ranges of each of their keys, sized from
   counts); a task sorts each table's entries by key and compares, vectorised, only the entries of equal-key runs (XOR +
   popcount), keeping pairs within d bits whose quarter colour sums do not already rule out `max_color` (a lower bound of the
   colour distance, so no pair that could be confirmed is lost).
5. confirm (per representative bucket, twice): candidate pairs are deduplicated (several tables find the same pair) and joined
   with both ends' thumbnails; `color_distance` and then `detail_distance` (about 0.1 ms a pair) confirm them. Detail thumbnails
   (3 KB) never travel: a pair that colour confirmed reads its two from the scans' memory-mapped `.detail.arrow`.
6. components: connected components of the confirmed edges by the alternating large-star / small-star rounds of Kiveris et al.
   (SoCC 2014), each round one pass over edge buckets.
7. gather + walk (per group of components): each component is walked in uid order (rows in different components never interact, so
   this is the sequential walk's result).
8. final (per group of shards): the marks of each shard, sorted by uid, to `_work/dups/`.

Cost per row: a few vectorised passes (hashing, sorting its bucket), (d+1) table entries of 16 bytes and C(k, d) sorts of 8-byte
keys per representative; compared pairs are the true near pairs plus about N/2^(key bits - log2 N + 1) <= N/8 random ones per
table. The walk is a Python loop over the rows that have a near-duplicate edge only.

Bounds. Every bucket count is chosen by the driver from counts alone (scan footers, per-task counts and block histograms in the
markers) so that a task holds about ROWS_PER_TASK rows or table entries; the driver holds counts per shard, per bucket and per
histogram bin, never per row. What one key gathers cannot be split: all rows of one sha256 (one exact-duplicate group), all
representatives with one leading-block value (one table range), all edges of one node, all nodes of one component. The collapse
keeps a pile of identical images (a placeholder) to one representative; what is left quadratic is a run of *distinct* hashes that
share a table key, e.g. 10,000 recoloured copies of one picture (same pHash, other thumbnails): their pairs are all compared.
Components are chains of near duplicates, in practice a few to a few hundred rows (the benchmark's largest: a cluster and its
variants); a component of millions of rows would be one walk task. k is capped at 8 blocks: past N = 2^30 representatives (d = 4)
the keys stop growing with log2 N and the random pairs per table grow as N^2 / 2^(key bits); for d >= 8, k = d + 1 is forced and
keys have 64/(d+1) bits."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.config import BadInputError, CleanConfig
from dallekit.images import DETAIL_BYTES, THUMB_BYTES, color_distance, detail_distance
from dallekit.io import take_rows, write_json_atomic, write_table_atomic
from dallekit.pipeline.hash_blocks import (
    choose_blocks,
    equal_key_pairs,
    histograms,
    key_ranges,
    lead_bits,
    sorted_keys,
    tables_led_by,
)
from dallekit.pipeline.passes import map_with_progress

# The rows (or table entries) one task holds at most; one key heavier than this (one sha256,
# one block value, one component) stays in one task. Small enough that a worker's peak memory
# does not grow with the dataset: 1M rows already splits into buckets of this size.
ROWS_PER_TASK = 500_000
MAX_ROUNDS = 100  # large-star/small-star converges in O(log^2 n) rounds; more means a bug
LOW = (1 << 32) - 1  # a representative's id is bucket << 32 | its index in reps/<bucket>.parquet
REASON_EXACT, REASON_NEAR = "duplicate_image", "near_duplicate_image"

THUMB = pa.binary(THUMB_BYTES)
S_UID = pa.schema([("uid", pa.string()), ("shard", pa.int32())])
S_REPS = pa.schema([("uid", pa.string()), ("shard", pa.int32()), ("row", pa.int32()), ("phash", pa.uint64()),
                     ("color_thumb", THUMB), ("detail_key", pa.uint64())])  # detail_key: a hash of the detail thumbnail
S_REF = pa.schema([("uid", pa.string()), ("shard", pa.int32()), ("row", pa.int32())])  # a surviving row of a scan shard
S_SHA = S_REF.append(pa.field("sha256", pa.string()))
S_IDS = pa.schema([("id", pa.int64()), ("uid", pa.string()), ("shard", pa.int32())])  # members (id: their rep) and nodes
SUMMARY = pa.binary(24)  # a thumbnail's 12 sums (2x2 regions of 4x4 pixels, 3 channels) as uint16: see _color_summary
S_TAB = pa.schema([("phash", pa.uint64()), ("id", pa.int64()), ("summary", SUMMARY)])
S_PAIRS = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("ham", pa.int8())])
S_PAIRS_THUMB = S_PAIRS.append(pa.field("thumb_a", THUMB)).append(pa.field("shard_a", pa.int32())).append(pa.field("row_a", pa.int32()))
S_EDGES = pa.schema([("u", pa.int64()), ("v", pa.int64())])
S_MARKS = pa.schema([("uid", pa.string()), ("shard", pa.int32()), ("reason", pa.string()),
                     ("duplicate_of", pa.string()), ("duplicate_distance", pa.int32())])
DUPS = ["uid", "reason", "duplicate_of", "duplicate_distance"]  # the columns of _work/dups/<shard>.parquet
# Intermediate files are read once, soon: hashes and thumbnails do not compress, dictionaries do not pay.
WRITE = {"compression": "none", "use_dictionary": False, "write_statistics": False}


# ---------------------------------------------------------------- numpy and file helpers


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit (bucket keys, uids in benchmarks)."""
    x = np.asarray(x).astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _string_hash(column: pa.ChunkedArray) -> np.ndarray:
    """A deterministic uint64 per string from its length and first and last 16 bytes: a bucket key, never an identity."""
    arr = pc.cast(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column, pa.large_binary())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    start, end = offsets[:-1], offsets[1:]
    width = int(end[0] - start[0]) if n else 0
    if 16 <= width and np.all(end - start == width):  # one length (sha256 hex, most uids): a zero-copy (n, width) view
        rows = data[offsets[0] : offsets[0] + n * width].reshape(n, width)
        return _fold(_mix(end - start), np.concatenate([rows[:, :16], rows[:, -16:]], axis=1))
    i = np.arange(16)
    head_at, tail_at = start[:, None] + i, end[:, None] - 16 + i
    pad = np.r_[data, np.zeros(1, np.uint8)]  # index len(data): a zero for the bytes a short string lacks
    head = pad[np.where(head_at < end[:, None], head_at, len(data))]
    tail = pad[np.where(tail_at >= start[:, None], tail_at, len(data))]
    return _fold(_mix(end - start), np.concatenate([head, tail], axis=1))


def _fold(h: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Mix the rows of a (n, 8m) uint8 array into the uint64 hashes h, one word at a time."""
    words = np.ascontiguousarray(data).view(np.uint64)
    for c in range(words.shape[1]):
        h = _mix(h ^ words[:, c])
    return h


def _thumbs(column) -> np.ndarray:
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


def _fsb(thumbs: np.ndarray) -> pa.Array:
    """An (n, w) uint8 array as a fixed_size_binary(w) Arrow array."""
    width = thumbs.shape[1]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(thumbs), [None, pa.py_buffer(np.ascontiguousarray(thumbs))])


def _np(table: pa.Table, *names: str) -> list[np.ndarray]:
    """Numeric columns as numpy arrays (empty ones too)."""
    return [table[name].to_numpy() if table.num_rows else np.zeros(0, table.schema.field(name).type.to_pandas_dtype())
            for name in names]


def _read(path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns)


def _read_parts(refs: list[list], schema: pa.Schema) -> pa.Table:
    """The parts `refs` ([path, offset, length, rows] each, from the producers' markers) as one table; empty with `schema` when none.

    Each part is read by its byte range, and must hold the rows its producer counted: a task
    that a killed driver left running then fails rather than read a file a rerun replaced.
    """
    tables = []
    for path, offset, length, rows in refs:
        fs, p = fsspec.core.url_to_fs(path)
        with fs.open(p, "rb") as f:
            f.seek(offset)
            table = pa.ipc.open_stream(pa.py_buffer(f.read(length))).read_all()
        if table.num_rows != rows:
            raise RuntimeError(f"{path}@{offset}: {table.num_rows} rows where {rows} were written (a stale task or a replaced file)")
        tables.append(table)
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


class _PartsFile:
    """One producer's output of one kind: an Arrow IPC stream per consumer, back to back in one file written atomically.

    One file per producer (not per producer and consumer) keeps the files of a pass linear in
    the dataset: P producers and C consumers write P files, read by byte range, not P * C.
    """

    def __init__(self, path: str) -> None:
        self.path, self.index = path, {}
        self.fs, p = fsspec.core.url_to_fs(path)
        parent, name = p.rsplit("/", 1)
        self.fs.makedirs(parent, exist_ok=True)
        self.local, self.tmp = p, f"{parent}/_tmp-{uuid.uuid4().hex}-{name}"
        self.file = self.fs.open(self.tmp, "wb")

    def add(self, key: Any, table: pa.Table) -> None:
        """The rows of consumer `key`."""
        start = self.file.tell()
        with pa.ipc.new_stream(self.file, table.schema) as writer:
            writer.write_table(table)
        self.index[str(key)] = [self.path, start, self.file.tell() - start, table.num_rows]

    def split(self, table: pa.Table, part: np.ndarray, key: Callable[[int], Any] = int) -> None:
        """The rows of `table` with each value v of `part`, for consumer key(v)."""
        if not table.num_rows:
            return
        if np.all(part == part[0]):  # one part: no reordering
            self.add(key(int(part[0])), table)
            return
        order = np.argsort(part, kind="stable")
        values, starts = np.unique(part[order], return_index=True)
        for value, lo, hi in zip(values.tolist(), starts.tolist(), np.r_[starts[1:], len(order)].tolist()):
            self.add(key(int(value)), _take(table, order[lo:hi]))

    def close(self) -> dict[str, list]:
        """Rename the file into place (none when no rows); the index {consumer key: [path, offset, length, rows]}."""
        self.file.close()
        if self.index:
            self.fs.mv(self.tmp, self.local)
        else:
            self.fs.rm(self.tmp)
        return self.index


def _write_parts(table: pa.Table, part: np.ndarray, path: str) -> dict[str, list]:
    """The rows of `table` with each value of `part`, for that consumer, in one file at `path`; its index (empty for no rows)."""
    out = _PartsFile(path)
    out.split(table, part)
    return out.close()


def _take(table: pa.Table, indices: Any) -> pa.Table:
    """Rows `indices` of a table; thumbnail columns through numpy (Arrow's take of fixed-size binary is 3x slower)."""
    indices = np.asarray(indices, np.int64)
    columns = [_fsb(_thumbs(table[name])[indices]) if table.schema.field(name).type == THUMB else table[name].take(pa.array(indices))
               for name in table.column_names]
    return pa.Table.from_arrays(columns, schema=table.schema)


def _expected(results: Any, kind: str) -> dict[str, list[list]]:
    """The parts of `kind` each consumer must read (from its producers' markers, in producer order)."""
    refs: dict[str, list[list]] = {}
    for result in results:
        for key, ref in result["parts"].get(kind, {}).items():
            refs.setdefault(key, []).append(ref)
    return refs


def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array."""
    if not len(sorted_keys):
        return np.zeros(0, np.int64)
    return np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])


def _marks(rows: pa.Table, reason: str, of: pa.Array | pa.ChunkedArray, distance: np.ndarray) -> pa.Table:
    """Marks for `rows` (with uid and shard): the reason, the uid they duplicate and the distance."""
    return pa.table({"uid": rows["uid"], "shard": rows["shard"], "reason": pa.array([reason] * rows.num_rows, pa.string()),
                     "duplicate_of": of, "duplicate_distance": pa.array(np.asarray(distance, np.int32))}, schema=S_MARKS)


def _write_marks(marks: pa.Table, root: str, group_of: list[int], name: str) -> dict[str, list]:
    """Marks for the final task of their shard's group; the index of the file written."""
    groups = np.asarray(group_of, np.int64)[_np(marks, "shard")[0]]
    return _write_parts(marks, groups, f"{root}/marks/{name}.arrow")


# ---------------------------------------------------------------- the driver


@dataclass
class _Run:
    """One dedup run: the client, the state folder, the shards and their groups."""

    client: Any
    root: str  # <work_dir>/dedup
    names: list[str]
    groups: list[list[int]]
    seconds: dict[str, list] = field(default_factory=dict)  # per pass: wall time, summed task time (this run's tasks)

    @property
    def group_of(self) -> list[int]:
        """The group of each shard."""
        out = [0] * len(self.names)
        for g, shards in enumerate(self.groups):
            for s in shards:
                out[s] = g
        return out

    def run(self, name: str, task: Callable, items: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """task(payload, **kwargs) for every item without a marker; every item's result, from its marker or this run."""
        fs, local = fsspec.core.url_to_fs(self.root)
        done_dir = f"{local}/_done/{name}"
        finished = {p.rsplit("/", 1)[-1].removesuffix(".json") for p in fs.glob(f"{done_dir}/*.json")}
        results = {key: _load_json(fs, f"{done_dir}/{key}.json") for key in items if key in finished}
        pending = [key for key in items if key not in finished]
        fs.makedirs(done_dir, exist_ok=True)
        start = time.perf_counter()
        payloads = [(f"{self.root}/_done/{name}/{key}.json", items[key]) for key in pending]
        if self.client is None:  # inside the one task of a small run
            out = [_marked(payload, task, **kwargs) for payload in payloads]
        else:
            out = map_with_progress(self.client, _marked, payloads, desc=f"dedup {name}", already_done=len(results), task=task, **kwargs)
        results.update(zip(pending, out))
        self.seconds[name] = [round(time.perf_counter() - start, 2), round(sum(r["task_seconds"] for r in out), 2)]
        return {key: results[key] for key in items}

    def drop_all(self) -> None:
        """Delete every folder of the run, markers too: result.json now answers a rerun."""
        fs, local = fsspec.core.url_to_fs(self.root)
        self.drop(*(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(local, detail=False) if not p.endswith(".json")))

    def drop(self, *folders: str) -> None:
        """Delete the data folders no later pass reads (their passes' markers stay)."""
        fs, local = fsspec.core.url_to_fs(self.root)
        for folder in folders:
            if fs.exists(f"{local}/{folder}"):
                fs.rm(f"{local}/{folder}", recursive=True)


def _marked(item: tuple[str, Any], task: Callable, **kwargs: Any) -> Any:
    """Run one task, then write its marker (its JSON result): the outputs are complete once the marker exists."""
    marker, payload = item
    start = time.perf_counter()
    result = task(payload, **kwargs) | {"task_seconds": round(time.perf_counter() - start, 3)}
    result = json.loads(json.dumps(result))  # the same value a rerun reads from the marker
    write_json_atomic(result, marker)
    return result


def _load_json(fs: Any, path: str) -> Any:
    with fs.open(path, "r") as f:
        return json.load(f)


def _claim(root: str, params: dict) -> dict | None:
    """The result of a finished run with these parameters, or None; state of a run with other parameters is removed."""
    fs, local = fsspec.core.url_to_fs(root)
    params = json.loads(json.dumps(params))
    if fs.exists(f"{local}/params.json") and _load_json(fs, f"{local}/params.json") != params:
        fs.rm(local, recursive=True)
    if fs.exists(f"{local}/result.json"):
        return _load_json(fs, f"{local}/result.json")
    fs.makedirs(local, exist_ok=True)
    write_json_atomic(params, f"{root}/params.json")
    return None


def _shard_groups(names: list[str], work_dir: str) -> tuple[list[list[int]], int]:
    """Consecutive scan shards grouped to about ROWS_PER_TASK rows (from the footers), and the total rows."""
    groups, rows, total = [[]], 0, 0
    for s, name in enumerate(names):
        fs, p = fsspec.core.url_to_fs(f"{work_dir}/scan/{name}.parquet")
        with fs.open(p, "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
        if groups[-1] and rows + n > ROWS_PER_TASK:
            groups.append([])
            rows = 0
        groups[-1].append(s)
        rows, total = rows + n, total + n
    return groups, total


def dedup(client: Any, shard_names: list[str], work_dir: str, distance: int,
          max_color: float | None = CleanConfig.near_dup_color_distance,
          max_detail: float | None = CleanConfig.near_dup_detail_distance) -> dict[str, int]:
    """Mark exact and near duplicates over all scanned shards in distributed passes; writes _work/dups/<shard>.parquet, returns marks per shard.

    When all rows fit one task, the passes run inside a single Dask task: the same files and
    markers, without a round trip per pass (~25 ms each, 18 passes: most of a 3,000-row clean).
    """
    root = f"{work_dir.rstrip('/')}/dedup"
    done = _claim(root, {"shards": shard_names, "distance": distance, "max_color": max_color, "max_detail": max_detail})
    if done is not None:
        return done["marks"]
    groups, total = _shard_groups(shard_names, work_dir)
    args = (root, work_dir, shard_names, groups, total, distance, max_color, max_detail)
    if client is not None and total <= ROWS_PER_TASK:
        return map_with_progress(client, _passes_task, [args], desc="dedup")[0]
    return _passes(client, *args)


def _passes_task(args: tuple) -> dict[str, int]:
    """Every pass of a small run, in this worker."""
    return _passes(None, *args)


def _passes(client: Any, root: str, work_dir: str, shard_names: list[str], groups: list[list[int]], total: int, distance: int,
            max_color: float | None, max_detail: float | None) -> dict[str, int]:
    """The passes (as Dask tasks, or here when `client` is None), then result.json; marks per shard."""
    run = _Run(client, root, shard_names, groups)
    stats, marked = _exact_passes(run, work_dir, total, near=distance >= 0)
    if distance >= 0:
        k = choose_blocks(stats["survivors"], distance)  # from an upper bound of the representatives: any k finds every pair
        near_stats, near_marked = _near_passes(run, stats["near_buckets"], stats.pop("coll"), k, distance, max_color, max_detail)
        stats, marked = stats | near_stats, marked + near_marked
    found = run.run("final", _final, _items(range(len(groups)), marks=_expected(marked, "marks")), root=root,
                    work_dir=work_dir, names=shard_names, groups=groups)
    marks = {name: n for result in found.values() for name, n in result["marks_per_shard"].items()}
    stats |= {"marks": sum(marks.values()), "pass_seconds": run.seconds}
    write_json_atomic({"marks": marks, "stats": stats}, f"{root}/result.json")
    run.drop_all()
    return {name: marks[name] for name in shard_names}


def dedup_stats(work_dir: str) -> dict[str, int]:
    """The counts of a finished dedup run (rows, representatives, k, compared pairs, edges, rounds...)."""
    fs, local = fsspec.core.url_to_fs(f"{work_dir.rstrip('/')}/dedup/result.json")
    return _load_json(fs, local)["stats"]


def _items(keys: Any, **expect: dict[str, list]) -> dict[str, tuple[Any, dict[str, list]]]:
    """Consumer tasks: key -> (key, the parts of each input kind its producers wrote for it)."""
    return {str(key): (key, {kind: refs.get(str(key), []) for kind, refs in expect.items()}) for key in keys}


def _exact_passes(run: _Run, work_dir: str, total: int, near: bool) -> tuple[dict, list]:
    """Passes 1-2: uid uniqueness and sha256 repeats; the survivors go to `near_buckets` buckets for the near passes."""
    buckets = max(1, math.ceil(total / ROWS_PER_TASK))
    split = run.run("split", _split, {str(g): (g, shards) for g, shards in enumerate(run.groups)},
                    root=run.root, work_dir=work_dir, names=run.names, buckets=buckets).values()
    nulls = [(name, n) for result in split for name, n in result["nulls"]]
    if nulls:  # as check_unique_uids words it, for every shard with such rows
        from dallekit.pipeline.clean import check_unique_uids

        check_unique_uids(pa.chunked_array([[None] * sum(n for _, n in nulls)], pa.string()),
                          pa.chunked_array([[f"{name}.parquet" for name, n in nulls for _ in range(n)]]))
    survivors = sum(result["survivors"] for result in split)
    near_buckets = max(1, math.ceil(survivors / ROWS_PER_TASK)) if near else 0
    exact = run.run("exact", _exact, _items(range(buckets), uid=_expected(split, "uid"), sha=_expected(split, "sha")),
                    root=run.root, names=run.names, group_of=run.group_of, near=near).values()
    repeats = [result["repeat"] for result in exact if result["repeat"]]
    if repeats:  # the smallest repeated uid, as one check over all rows would name it
        raise BadInputError(min(repeats)[1])
    run.drop("uid", "sha")
    stats = {"rows": total, "survivors": survivors, "exact_duplicates": sum(r["duplicates"] for r in exact),
             "near_buckets": near_buckets}
    if near:
        prepared = run.run("prepare", _prepare, _items(range(len(run.groups)), keep=_expected(exact, "keep")), root=run.root,
                           work_dir=work_dir, names=run.names, groups=run.groups, buckets=near_buckets).values()
        run.drop("keep")
        stats["coll"] = _expected(prepared, "coll")
    return stats, list(exact)


def _near_passes(run: _Run, buckets: int, coll: dict[str, int], k: int, distance: int,
                 max_color: float | None, max_detail: float | None) -> tuple[dict, list]:
    """Passes 3-7: collapse, permuted tables (k blocks), colour confirmation, components and the walk."""
    each = range(buckets)
    collapsed = run.run("collapse", _collapse, _items(each, coll=coll), root=run.root, k=k, distance=distance).values()
    run.drop("coll")
    reps = sum(r["reps"] for r in collapsed)
    hist = [np.sum([r["hist"][j] for r in collapsed], axis=0) for j in range(distance + 1)]
    bounds = {j: key_ranges(h, ROWS_PER_TASK) for j, h in enumerate(hist)}
    tab = run.run("tabmap", _tabmap, _items(each), root=run.root, k=k, bounds=bounds).values()
    table_keys = [f"{j}-{r}" for j, starts in bounds.items() for r in range(len(starts))]
    tables = run.run("tables", _tables, _items(table_keys, tab=_expected(tab, "tab")), root=run.root, k=k, distance=distance,
                     max_color=max_color).values()
    run.drop("tab")
    confirm = run.run("confirm_a", _confirm_a, _items(each, cand=_expected(tables, "cand")), root=run.root).values()
    run.drop("cand")
    confirmed = run.run("confirm_b", _confirm_b, _items(each, cand2=_expected(confirm, "cand2")), root=run.root,
                        max_color=max_color, max_detail=max_detail, work_dir=run.root.removesuffix("/dedup"), names=run.names).values()
    run.drop("cand2")
    edges = sum(r["edges"] for r in confirmed)
    last, cc = _components(run, each, _expected(confirmed, "cc"))
    walkers = max(1, math.ceil(2 * edges / ROWS_PER_TASK))
    gathered = run.run("gather", _gather, _items(each, wedge=_expected(confirmed, "wedge"), cc=cc), root=run.root, last=last,
                       walkers=walkers, group_of=run.group_of).values()
    run.drop("cc", "wedge", "members", "reps")
    inputs = {kind: _expected(gathered, kind) for kind in ("nodes", "edges", "members")}
    walked = run.run("walk", _walk, _items(range(walkers), **inputs), root=run.root, group_of=run.group_of).values()
    run.drop("walkin")
    stats = {"representatives": reps, "blocks": k, "tables": math.comb(k, distance), "table_tasks": len(tables),
             "compared_pairs": sum(r["compared"] for r in tables), "edges": edges, "components_rounds": last,
             "edge_nodes": sum(r["nodes"] for r in walked)}
    return stats, list(gathered) + list(walked)


def _components(run: _Run, each: range, expect: dict[str, int]) -> tuple[int, dict[str, int]]:
    """Large-star / small-star rounds until every bucket's edges form stars: the folder holding them and its file counts."""
    for r in range(MAX_ROUNDS):
        result = run.run(f"cc{r}", _cc_round, _items(each, cc=expect), root=run.root, round_no=r).values()
        run.drop(f"cc/{r}")
        expect = _expected(result, "cc")
        if all(x["star"] for x in result):  # round r's input was stars: its output is the same stars
            return r + 1, expect
    raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")


# ---------------------------------------------------------------- passes 1-3: split, exact, collapse


def _split(item: tuple[int, list[int]], root: str, work_dir: str, names: list[str], buckets: int) -> dict:
    """Pass 1, one task per group of scan shards: every uid to its uid bucket, every surviving row to its sha256 bucket."""
    g, shards = item
    parts = []
    for s in shards:
        scan = _read(f"{work_dir}/scan/{names[s]}.parquet", ["uid", "reason", "sha256"])
        parts += [scan.append_column("shard", pa.array(np.full(scan.num_rows, s, np.int32)))
                  .append_column("row", pa.array(np.arange(scan.num_rows, dtype=np.int32)))]
    rows = pa.concat_tables(parts)
    nulls = [[names[s], part["uid"].null_count] for s, part in zip(shards, parts)]
    if rows["uid"].null_count:
        rows = rows.filter(pc.is_valid(rows["uid"]))
    uid_parts = _write_parts(rows.select(S_UID.names).cast(S_UID), _string_hash(rows["uid"]) % np.uint64(buckets),
                             f"{root}/uid/{g}.arrow")
    live = rows.filter(pc.is_null(rows["reason"])).select(S_SHA.names).cast(S_SHA)
    sha_parts = _write_parts(live, _string_hash(pc.fill_null(live["sha256"], "")) % np.uint64(buckets),
                             f"{root}/sha/{g}.arrow")
    return {"nulls": [x for x in nulls if x[1]], "survivors": live.num_rows, "parts": {"uid": uid_parts, "sha": sha_parts}}


def _repeated_uid(uids: pa.Table, names: list[str]) -> list | None:
    """[uid, message] for the smallest uid of the bucket seen twice, worded by check_unique_uids; None when all are unique."""
    from dallekit.pipeline.clean import check_unique_uids  # clean imports this module

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


def _exact(item: tuple[int, dict], root: str, names: list[str], group_of: list[int], near: bool) -> dict:
    """Pass 2, one task per bucket: repeated uids, then sha256 repeats (the first in uid order keeps); survivors back to their group."""
    b, expect = item
    repeat = _repeated_uid(_read_parts(expect["uid"], S_UID), names)
    rows = _read_parts(expect["sha"], S_SHA)
    rows = rows.take(pc.sort_indices(rows, [("sha256", "ascending"), ("uid", "ascending")]))
    n, sha = rows.num_rows, rows["sha256"]
    same = np.zeros(n, bool)
    if n > 1:  # a null sha256 equals nothing
        same[1:] = pc.fill_null(pc.equal(sha.slice(1), sha.slice(0, n - 1)), False).to_numpy(zero_copy_only=False)
    first = np.maximum.accumulate(np.where(same, 0, np.arange(n)))
    dups = np.flatnonzero(same)
    marks = _marks(rows.take(dups), REASON_EXACT, rows["uid"].take(first[dups]), np.zeros(len(dups)))
    parts = {"marks": _write_marks(marks, root, group_of, f"exact-{b}")}
    if near:
        live = rows.filter(pa.array(~same)).select(S_REF.names)
        groups = np.asarray(group_of, np.int64)[_np(live, "shard")[0]]
        parts["keep"] = _write_parts(live, groups, f"{root}/keep/{b}.arrow")
    return {"repeat": repeat, "duplicates": len(dups), "parts": parts}


def _prepare(item: tuple[int, dict], root: str, work_dir: str, names: list[str], groups: list[list[int]], buckets: int) -> dict:
    """Pass 2b, one task per group of shards: the survivors' pHash, thumbnail and detail key from the scans, to their buckets.

    Thumbnails (192 bytes a row) are read once here rather than carried through the sha256 shuffle (most rows only pass them on).
    """
    g, expect = item
    refs = _read_parts(expect["keep"], S_REF)
    refs = refs.take(pc.sort_indices(refs, [("shard", "ascending"), ("row", "ascending")]))
    shard, row = _np(refs, "shard", "row")
    n = len(row)
    ph, thumbs, valid = np.zeros(n, np.uint64), np.empty((n, THUMB_BYTES), np.uint8), np.ones(n, bool)
    keys = np.zeros(n, np.uint64)  # the scan's hash of each detail thumbnail (0 in scans without one): 3 KB a row never travels
    for s in groups[g]:  # each shard's rows gathered straight into place
        lo, hi = np.searchsorted(shard, s, "left"), np.searchsorted(shard, s, "right")
        if lo < hi:
            scan = _read(f"{work_dir}/scan/{names[s]}.parquet")
            ph[lo:hi] = pc.fill_null(scan["phash"], 0).to_numpy()[row[lo:hi]]
            np.take(_thumbs(scan["color_thumb"]), row[lo:hi], axis=0, out=thumbs[lo:hi])
            if "detail_key" in scan.column_names:
                keys[lo:hi] = pc.fill_null(scan["detail_key"], 0).to_numpy()[row[lo:hi]]
            valid[lo:hi] = pc.is_valid(scan["phash"]).to_numpy(zero_copy_only=False)[row[lo:hi]]  # no pHash: nothing to compare
    rows = pa.table({"uid": refs["uid"], "shard": refs["shard"], "row": row, "phash": ph, "color_thumb": _fsb(thumbs),
                     "detail_key": keys}, schema=S_REPS)
    if not valid.all():
        keep = np.flatnonzero(valid)
        rows, ph, thumbs, keys = _take(rows, keep), ph[keep], thumbs[keep], keys[keep]
    part = _fold(_mix(ph ^ _mix(keys)), thumbs) % np.uint64(buckets)  # identical images land in one collapse bucket
    return {"parts": {"coll": _write_parts(rows, part, f"{root}/coll/{g}.arrow")}}


def _collapse(item: tuple[int, dict], root: str, k: int, distance: int) -> dict:
    """Pass 3, one task per bucket: identical (pHash, thumbnail, detail key) rows to one representative, the first in uid order."""
    p, expect = item
    rows = _read_parts(expect["coll"], S_REPS)
    rows = _take(rows, pc.sort_indices(rows, [(name, "ascending") for name in ("phash", "color_thumb", "detail_key", "uid")]))
    ph, keys = _np(rows, "phash", "detail_key")
    words = np.concatenate([_thumbs(rows["color_thumb"]).view(np.uint64), keys[:, None]], axis=1)
    new = np.ones(len(ph), bool)
    new[1:] = (ph[1:] != ph[:-1]) | (words[1:] != words[:-1]).any(axis=1)
    local = np.cumsum(new) - 1
    reps = _take(rows, np.flatnonzero(new))  # with its colour summary, computed once here where the thumbnails are read
    summary = _color_summary(_thumbs(reps["color_thumb"]))
    reps = reps.append_column("summary", pa.FixedSizeBinaryArray.from_buffers(SUMMARY, len(summary), [None, pa.py_buffer(summary)]))
    write_table_atomic(reps, f"{root}/reps/{p}.parquet", **WRITE)
    member = pa.array(~new)
    members = pa.table({"id": (p << 32) + local[~new], "uid": rows["uid"].filter(member), "shard": rows["shard"].filter(member)},
                       schema=S_IDS)
    write_table_atomic(members, f"{root}/members/{p}.parquet", **WRITE)
    return {"reps": int(new.sum()), "members": int((~new).sum()), "hist": histograms(ph[new], k, distance)}


# ---------------------------------------------------------------- passes 4-5: tables and colour


def _color_summary(thumbs: np.ndarray) -> np.ndarray:
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


def _color_bound(summary_a: np.ndarray, summary_b: np.ndarray) -> np.ndarray:
    """A lower bound of color_distance from two (n, 12) summaries."""
    return np.abs(summary_a.astype(np.int32) - summary_b.astype(np.int32)).sum(axis=1) / THUMB_BYTES


def _summaries(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A SUMMARY column as an (n, 12) uint16 array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 12), np.uint16)
    return np.frombuffer(arr.buffers()[1], np.uint16)[arr.offset * 12 : (arr.offset + len(arr)) * 12].reshape(-1, 12)


def _tabmap(item: tuple[int, dict], root: str, k: int, bounds: dict[int, list[int]]) -> dict:
    """Pass 4a, one task per representative bucket: each representative to the table partition of every leading block."""
    p = item[0]
    reps = _read(f"{root}/reps/{p}.parquet", ["phash", "summary"])
    (ph,) = _np(reps, "phash")
    table = pa.table({"phash": ph, "id": (p << 32) + np.arange(len(ph), dtype=np.int64), "summary": reps["summary"]}, schema=S_TAB)
    out = _PartsFile(f"{root}/tab/{p}.arrow")
    for lead, starts in bounds.items():
        part = np.searchsorted(np.asarray(starts), lead_bits(ph, k, lead), side="right") - 1
        out.split(table, part, key=lambda r, lead=lead: f"{lead}-{r}")
    return {"parts": {"tab": out.close()}}


def _tables(item: tuple[str, dict], root: str, k: int, distance: int, max_color: float | None) -> dict:
    """Pass 4b, one task per (leading block, key range): sort each table led by the block, compare within equal keys.

    Pairs whose colour summaries already rule out `max_color` are dropped here.
    """
    key, expect = item
    lead, r = (int(x) for x in key.split("-"))
    entries = _read_parts(expect["tab"], S_TAB)
    ph, ids = _np(entries, "phash", "id")
    summary = _summaries(entries["summary"])
    found, compared = [], 0
    for blocks in tables_led_by(k, distance, lead):
        keys, order = sorted_keys(ph, k, blocks)
        i, j, bits, n = equal_key_pairs(keys, ph[order], distance)
        if max_color is not None and len(i):
            near = _color_bound(summary[order[i]], summary[order[j]]) <= max_color
            i, j, bits = i[near], j[near], bits[near]
        a, b = ids[order[i]], ids[order[j]]
        found.append((np.minimum(a, b), np.maximum(a, b), bits.astype(np.int8)))
        compared += n
    a, b, bits = (np.concatenate(x) for x in zip(*found)) if found else (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.int8),)
    pairs = pa.table({"a": a, "b": b, "ham": bits}, schema=S_PAIRS)
    parts = _write_parts(pairs, a >> 32, f"{root}/cand/{lead}-{r}.arrow")
    return {"compared": compared, "candidates": len(a), "parts": {"cand": parts}}


def _rep_thumbs(root: str, p: int) -> np.ndarray:
    """The thumbnails of bucket p's representatives, indexed by their local id."""
    return _thumbs(_read(f"{root}/reps/{p}.parquet", ["color_thumb"])["color_thumb"])


def _details(work_dir: str, names: list[str], shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """The detail thumbnails of scan rows (shard, row), (n, 3072); zeros where a scan has none (then colour alone confirms)."""
    out = np.zeros((len(row), DETAIL_BYTES), np.uint8)
    for s, path in ((s, f"{work_dir}/scan/{names[s]}.detail.arrow") for s in np.unique(shard).tolist()):
        if fsspec.core.url_to_fs(path)[0].exists(fsspec.core.url_to_fs(path)[1]):
            out[shard == s] = take_rows(path, row[shard == s])
    return out


def _confirm_a(item: tuple[int, dict], root: str) -> dict:
    """Pass 5a, one task per bucket of the first end: each candidate pair once, with its first thumbnail, to the second end's bucket."""
    p, expect = item
    a, b, bits = _np(_read_parts(expect["cand"], S_PAIRS), "a", "b", "ham")
    order = np.lexsort((b, a))
    a, b, bits = a[order], b[order], bits[order]
    once = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    a, b, bits = a[once], b[once], bits[once]
    reps = _read(f"{root}/reps/{p}.parquet", ["color_thumb", "shard", "row"])
    thumbs = _thumbs(reps["color_thumb"])[a & LOW] if len(a) else np.zeros((0, THUMB_BYTES), np.uint8)
    shard, row = (x[a & LOW] for x in _np(reps, "shard", "row"))
    pairs = pa.table({"a": a, "b": b, "ham": bits, "thumb_a": _fsb(thumbs), "shard_a": shard, "row_a": row}, schema=S_PAIRS_THUMB)
    return {"pairs": len(a), "parts": {"cand2": _write_parts(pairs, b >> 32, f"{root}/cand2/{p}.arrow")}}


def _confirm_b(item: tuple[int, dict], root: str, max_color: float | None, max_detail: float | None, work_dir: str,
               names: list[str]) -> dict:
    """Pass 5b, one task per bucket of the second end: colour_distance, then detail_distance confirm each pair; edges for the walk and the components.

    Detail thumbnails are read from the scans' `.detail.arrow` files, only for the pairs colour confirmed; a pair where either
    end has none (zeros: a scan written without them) is confirmed by colour alone.
    """
    q, expect = item
    pairs = _read_parts(expect["cand2"], S_PAIRS_THUMB)
    a, b, bits = _np(pairs, "a", "b", "ham")
    agree = np.ones(len(a), bool)
    if max_color is not None and len(a):
        agree = color_distance(_thumbs(pairs["thumb_a"]), _rep_thumbs(root, q)[b & LOW]) <= max_color
    if max_detail is not None and agree.any():
        at = np.flatnonzero(agree)
        reps = _read(f"{root}/reps/{q}.parquet", ["shard", "row"])
        detail_a = _details(work_dir, names, *(x[at] for x in _np(pairs, "shard_a", "row_a")))
        detail_b = _details(work_dir, names, *(x[b[at] & LOW] for x in _np(reps, "shard", "row")))
        missing = ~detail_a.any(axis=1) | ~detail_b.any(axis=1)
        agree[at] = missing | (detail_distance(detail_a, detail_b, enough=max_detail) <= max_detail)
    a, b, bits = a[agree], b[agree], bits[agree]
    edges = pa.table({"a": a, "b": b, "ham": bits}, schema=S_PAIRS)
    parts = {"wedge": _write_parts(edges, a >> 32, f"{root}/wedge/{q}.arrow"),
             "cc": _write_edges(np.r_[a, b], np.r_[b, a], f"{root}/cc/0", q)}
    return {"edges": len(a), "parts": parts}


# ---------------------------------------------------------------- pass 6: components


def _write_edges(u: np.ndarray, v: np.ndarray, folder: str, source: int) -> dict[str, list]:
    """Directed edges (u, v) to the bucket of u, for the next components round; the index of the file written."""
    keep = u != v
    return _write_parts(pa.table({"u": u[keep], "v": v[keep]}, schema=S_EDGES), u[keep] >> 32, f"{folder}/{source}.arrow")


def _neighbourhoods(refs: list[list]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bucket's edges (u, v) once each, sorted by (u, v), and the start of each u's run."""
    u, v = _np(_read_parts(refs, S_EDGES), "u", "v")
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    once = np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])] if len(u) else np.zeros(0, bool)
    u, v = u[once], v[once]
    return u, v, _runs(u)


def _cc_round(item: tuple[int, dict], root: str, round_no: int) -> dict:
    """Pass 6, one task per node bucket and round: large-star (even rounds) or small-star (odd) of Kiveris et al.

    Both keep the components and end, in O(log^2 n) rounds, with every component a star around
    its smallest node. Whether this bucket's input already is stars is checked per node: a
    node either has only larger neighbours (a centre) or exactly one, smaller (a leaf).
    """
    p, expect = item
    u, v, starts = _neighbourhoods(expect["cc"])
    if not len(u):
        return {"star": True, "edges": 0, "parts": {"cc": {}}}
    nodes, lowest, degree = u[starts], np.minimum.reduceat(v, starts), np.diff(np.r_[starts, len(u)])
    star = bool(np.all((lowest > nodes) | ((degree == 1) & (lowest < nodes))))
    if round_no % 2 == 0:  # large-star: every larger neighbour of u links to the smallest of u and its neighbours
        centre = np.repeat(np.minimum(nodes, lowest), degree)
        larger = v > u
        x, y = v[larger], centre[larger]
    else:  # small-star: u and its smaller neighbours link to the smallest of them
        smaller = v < u
        su, sv = u[smaller], v[smaller]
        firsts = _runs(su)
        centre = np.repeat(sv[firsts], np.diff(np.r_[firsts, len(su)]))
        x, y = np.r_[sv, su[firsts]], np.r_[centre, sv[firsts]]
    parts = _write_edges(np.r_[x, y], np.r_[y, x], f"{root}/cc/{round_no + 1}", p)
    return {"star": star, "edges": len(u), "parts": {"cc": parts}}


# ---------------------------------------------------------------- pass 7: gather and walk


def _gather(item: tuple[int, dict], root: str, last: int, walkers: int, group_of: list[int]) -> dict:
    """Pass 7a, one task per bucket: its nodes, edges and members to the walk task of their component; members of lone representatives marked."""
    p, expect = item
    u, v, starts = _neighbourhoods(expect["cc"])
    nodes = u[starts]
    comp = np.minimum(nodes, np.minimum.reduceat(v, starts)) if len(nodes) else nodes  # stars: the centre is the component's smallest node
    walker = (_mix(comp) % np.uint64(walkers)).astype(np.int64)
    reps = _read(f"{root}/reps/{p}.parquet", ["uid", "shard"])
    local = pa.array(nodes & LOW)
    node_rows = pa.table({"id": nodes, "uid": reps["uid"].take(local), "shard": reps["shard"].take(local)}, schema=S_IDS)
    parts = {"nodes": _write_parts(node_rows, walker, f"{root}/walkin/nodes-{p}.arrow")}
    edges = _read_parts(expect["wedge"], S_PAIRS)
    at_edge = walker[np.searchsorted(nodes, _np(edges, "a")[0])]
    parts["edges"] = _write_parts(edges, at_edge, f"{root}/walkin/edges-{p}.arrow")
    members = _read(f"{root}/members/{p}.parquet")
    (rep,) = _np(members, "id")
    at = np.minimum(np.searchsorted(nodes, rep), max(len(nodes) - 1, 0))
    linked = (nodes[at] == rep) if len(nodes) else np.zeros(len(rep), bool)
    parts["members"] = _write_parts(members.filter(pa.array(linked)), walker[at[linked]],
                                    f"{root}/walkin/members-{p}.arrow")
    lone = members.filter(pa.array(~linked))  # no near edge: the representative is kept and is the nearest (0 bits)
    of = reps["uid"].take(pa.array(_np(lone, "id")[0] & LOW))
    parts["marks"] = _write_marks(_marks(lone, REASON_NEAR, of, np.zeros(lone.num_rows)), root, group_of, f"near-{p}")
    return {"nodes": len(nodes), "parts": parts}


def _keep_first(n: int, late: np.ndarray, early: np.ndarray) -> np.ndarray:
    """The sequential walk over ranks 0..n-1: a node is kept unless a neighbour earlier in uid order was kept."""
    keep = [True] * n
    order = np.argsort(late, kind="stable")
    late, early = late[order], early[order]
    starts = _runs(late)
    earlier = early.tolist()
    for node, lo, hi in zip(late[starts].tolist(), starts.tolist(), np.r_[starts[1:], len(late)].tolist()):
        if any(keep[x] for x in earlier[lo:hi]):
            keep[node] = False
    return np.array(keep, bool)


def _nearest(rows: np.ndarray, nbrs: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct row, the neighbour with the fewest bits, ties to the smallest rank: (rows, neighbours, bits)."""
    order = np.lexsort((nbrs, bits, rows))
    pick = order[_runs(rows[order])]
    return rows[pick], nbrs[pick], bits[pick]


def _member_targets(rep: np.ndarray, pos: np.ndarray, kept: np.ndarray, a: np.ndarray, b: np.ndarray,
                    bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(neighbour rank, bits) each member duplicates: the walk's result for a row identical to its representative.

    A member m (same pHash and thumbnail as its representative r, later in uid order) has r's
    neighbours, plus r at 0 bits. It is never kept: r or, if r was rejected, r's kept earlier
    neighbour is a kept neighbour before it. So members block nobody and the walk over
    representatives alone decides every representative. m's target is the nearest kept
    neighbour of r with a uid below m's (r itself at 0 bits when kept, which nothing earlier
    can beat). `pos` is the number of nodes with a uid below the member's.
    """
    n = len(kept)
    ends, nbrs, nb_bits = np.r_[a, b], np.r_[b, a], np.r_[bits, bits].astype(np.int64)
    use = kept[nbrs]
    ends, nbrs, nb_bits = ends[use], nbrs[use], nb_bits[use]
    order = np.lexsort((nbrs, ends))
    ends, nbrs, nb_bits = ends[order], nbrs[order], nb_bits[order]
    best = pd.Series(nb_bits * (n + 1) + nbrs).groupby(ends).cummin().to_numpy() if len(ends) else np.zeros(1, np.int64)
    at = np.searchsorted(ends * (n + 1) + nbrs, rep * (n + 1) + pos) - 1  # the last kept neighbour below the member's uid
    chosen = best[np.maximum(at, 0)]
    return np.where(kept[rep], rep, chosen % (n + 1)), np.where(kept[rep], 0, chosen // (n + 1))


def _walk(item: tuple[int, dict], root: str, group_of: list[int]) -> dict:
    """Pass 7b, one task per group of components: the keep-first walk in uid order; marks for rejected nodes and members."""
    w, expect = item
    nodes = _read_parts(expect["nodes"], S_IDS)
    nodes = nodes.take(pc.sort_indices(nodes, [("uid", "ascending")]))
    (ids,) = _np(nodes, "id")
    by_id = np.argsort(ids)

    def rank(x: np.ndarray) -> np.ndarray:  # node id -> its rank in uid order
        return by_id[np.searchsorted(ids[by_id], x)]

    a, b, bits = _np(_read_parts(expect["edges"], S_PAIRS), "a", "b", "ham")
    a, b = rank(a), rank(b)
    late, early = np.maximum(a, b), np.minimum(a, b)
    kept = _keep_first(len(ids), late, early)
    hit = kept[early] & ~kept[late]
    rows, of, dist = _nearest(late[hit], early[hit], bits[hit].astype(np.int64))
    uids = nodes["uid"]
    marks = [_marks(nodes.take(pa.array(rows, pa.int64())), REASON_NEAR, uids.take(pa.array(of, pa.int64())), dist)]
    members = _read_parts(expect["members"], S_IDS)
    pos = np.searchsorted(uids.to_numpy(zero_copy_only=False), members["uid"].to_numpy(zero_copy_only=False))
    target, dist = _member_targets(rank(_np(members, "id")[0]), pos, kept, a, b, bits)
    marks.append(_marks(members, REASON_NEAR, uids.take(pa.array(target, pa.int64())), dist))
    written = _write_marks(pa.concat_tables(marks), root, group_of, f"walk-{w}")
    return {"nodes": len(ids), "rejected": len(rows), "members": members.num_rows, "parts": {"marks": written}}


# ---------------------------------------------------------------- pass 8: final


def _final(item: tuple[int, dict], root: str, work_dir: str, names: list[str], groups: list[list[int]]) -> dict:
    """Pass 8, one task per group of shards: each shard's marks sorted by uid, to _work/dups/<shard>.parquet."""
    g, expect = item
    marks = _read_parts(expect["marks"], S_MARKS)
    marks = marks.take(pc.sort_indices(marks, [("shard", "ascending"), ("uid", "ascending")]))
    (shard,) = _np(marks, "shard")
    out = {}
    for s in groups[g]:
        lo, hi = np.searchsorted(shard, s, "left"), np.searchsorted(shard, s, "right")
        write_table_atomic(marks.slice(lo, hi - lo).select(DUPS), f"{work_dir}/dups/{names[s]}.parquet")
        out[names[s]] = int(hi - lo)
    return {"marks_per_shard": out}
