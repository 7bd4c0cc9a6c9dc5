"""The one stage runner: shard listing, atomic writes, rejects, per-shard stats, _SUCCESS, resume.

A stage hands `run_stage` a list of `ShardTask`s and a function that turns one task's payload
into a `ShardResult` (kept rows, rejected rows with a `reason`, counters). One Dask task runs
per shard. Each finished shard leaves three things, written in this order:

    part-NNNNN.parquet           kept rows (renamed into place from _tmp/)
    _rejects/part-NNNNN.parquet  rejected rows with `reason` (only when there are some)
    _progress/part-NNNNN.json    its counts: the mark that the shard is complete

A rerun skips shards with a progress mark and redoes the rest, so an interrupted stage ends
with every uid exactly once. `_stats.json` sums the marks and `_SUCCESS` closes the stage.
Folders starting with `_` are ignored by pyarrow and Dask when they read the stage folder.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from dallekit.config import BadInputError

SHARD_GLOB = "part-*.parquet"


@dataclass
class ShardTask:
    """One unit of work: the output shard's name and what the stage needs to compute it."""

    name: str  # "part-00042"
    payload: Any


@dataclass
class ShardResult:
    """What a stage's shard function returns: kept rows, rejected rows and counters."""

    rows_in: int
    kept: pa.Table
    rejects: pa.Table | None = None  # must carry a `reason` column
    counters: dict[str, dict[str, int]] = field(default_factory=dict)  # e.g. {"status": {"success": 9}}


def shard_name(index: int) -> str:
    """The file stem of shard `index`."""
    return f"part-{index:05d}"


def list_shards(input_dir: str) -> list[str]:
    """Sorted full paths of the Parquet shards of a stage folder; bad input if there are none."""
    fs, root = fsspec.core.url_to_fs(input_dir)
    if not fs.isdir(root):
        raise BadInputError(f"{input_dir}: not a folder of Parquet shards")
    paths = sorted(fs.glob(f"{root.rstrip('/')}/{SHARD_GLOB}"))
    if not paths:
        raise BadInputError(f"{input_dir}: no {SHARD_GLOB} shards found (is it a stage output folder?)")
    return [fs.unstrip_protocol(p) for p in paths] if "://" in input_dir else paths


def read_shard(path: str, columns: list[str] | None = None) -> pa.Table:
    """Read one shard as an Arrow table."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, columns=columns)


def shard_schema(path: str) -> tuple[pa.Schema, int]:
    """A shard's Arrow schema and row count, from its footer alone."""
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        return pf.schema_arrow, pf.metadata.num_rows


def write_table_atomic(table: pa.Table, path: str, **parquet_kwargs: Any) -> None:
    """Write a Parquet file under a temporary name beside the target and rename it into place."""
    fs, p = fsspec.core.url_to_fs(path)
    parent, name = p.rsplit("/", 1)
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/_tmp-{uuid.uuid4().hex}-{name}"  # `_` keeps readers from listing it
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, **parquet_kwargs)
    fs.mv(tmp, p)


def write_json_atomic(obj: Any, path: str) -> None:
    """Write JSON to a temporary name and rename it into place."""
    fs, p = fsspec.core.url_to_fs(path)
    tmp = f"{p}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    fs.mv(tmp, p)


def _run_shard(task: ShardTask, output_dir: str, process: Callable[[Any], ShardResult], parquet_kwargs: dict) -> dict:
    """Compute one shard on a worker and commit it: kept rows, rejects, then the progress mark."""
    start = time.time()
    result = process(task.payload)
    n_kept = result.kept.num_rows
    n_rejected = result.rejects.num_rows if result.rejects is not None else 0
    if result.rows_in != n_kept + n_rejected:  # a bug in the stage, never bad input
        raise RuntimeError(f"{task.name}: {result.rows_in} rows in but {n_kept} kept + {n_rejected} rejected")
    root = output_dir.rstrip("/")
    write_table_atomic(result.kept, f"{root}/{task.name}.parquet", **parquet_kwargs)
    reject_path = f"{root}/_rejects/{task.name}.parquet"
    reasons: dict[str, int] = {}
    if n_rejected:
        write_table_atomic(result.rejects, reject_path)
        reasons = dict(collections.Counter(result.rejects.column("reason").to_pylist()))
    else:
        fs, p = fsspec.core.url_to_fs(reject_path)
        if fs.exists(p):  # left by an earlier, different attempt at this shard
            fs.rm(p)
    mark = {
        "shard": task.name,
        "rows_in": result.rows_in,
        "rows_out": n_kept,
        "rows_rejected": n_rejected,
        "reasons": reasons,
        "counters": result.counters,
        "seconds": round(time.time() - start, 3),
    }
    write_json_atomic(mark, f"{root}/_progress/{task.name}.json")
    return mark


def _read_marks(output_dir: str) -> dict[str, dict]:
    """The progress marks of the shards already complete."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    marks = {}
    for p in fs.glob(f"{root.rstrip('/')}/_progress/part-*.json"):
        with fs.open(p, "r") as f:
            mark = json.load(f)
        marks[mark["shard"]] = mark
    return marks


def _remove_debris(fs: Any, root: str) -> None:
    """Delete temporary files an interrupted run left behind."""
    for p in fs.glob(f"{root}/_tmp-*") + fs.glob(f"{root}/_rejects/_tmp-*") + fs.glob(f"{root}/_progress/*.tmp"):
        fs.rm(p)


def exists(path: str) -> bool:
    """Whether a local path or fsspec URL exists."""
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)


def stage_complete(output_dir: str) -> bool:
    """True when a stage folder holds a finished stage (_SUCCESS written)."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    return fs.exists(f"{root.rstrip('/')}/_SUCCESS")


def read_stats(output_dir: str) -> dict:
    """The `_stats.json` of a finished stage."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    with fs.open(f"{root.rstrip('/')}/_stats.json", "r") as f:
        return json.load(f)


def run_stage(
    stage: str,
    output_dir: str,
    tasks: Iterable[ShardTask],
    process: Callable[[Any], ShardResult],
    client: Any,
    config: dict | None = None,
    retries: int = 2,
    parquet_kwargs: dict | None = None,
    started: float | None = None,
) -> dict:
    """Run `process` on every task not yet complete, one Dask task per shard, then write _stats.json and _SUCCESS."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    if fs.exists(f"{root}/_SUCCESS"):
        print(f"{stage}: {output_dir} is already complete (remove it to run again)")
        return read_stats(output_dir)
    start = started or time.time()  # a stage with earlier passes counts them too
    tasks = list(tasks)
    fs.makedirs(f"{root}/_progress", exist_ok=True)
    fs.makedirs(f"{root}/_rejects", exist_ok=True)
    _remove_debris(fs, root)
    done = _read_marks(output_dir)
    names = {t.name for t in tasks}
    pending = [t for t in tasks if t.name not in done]
    if done:
        print(f"{stage}: resuming, {len(names & done.keys())} of {len(tasks)} shards already complete")
    new_marks = map_with_progress(
        client,
        _run_shard,
        pending,
        desc=stage,
        unit="shard",
        already_done=len(tasks) - len(pending),
        retries=retries,
        output_dir=output_dir,
        process=process,
        parquet_kwargs=parquet_kwargs or {},
    )
    done.update((m["shard"], m) for m in new_marks)
    marks = [done[name] for name in sorted(names)]
    stats = summarize(stage, marks, time.time() - start, config)
    write_json_atomic(stats, f"{root}/_stats.json")
    with fs.open(f"{root}/_SUCCESS", "w") as f:
        f.write("")
    return stats


def map_with_progress(
    client: Any, fn: Callable, items: list, desc: str, unit: str = "task", already_done: int = 0, retries: int = 2, **kwargs: Any
) -> list:
    """Run fn(item, **kwargs) as one Dask task per item with a progress bar; results in item order."""
    if not items:
        return []
    from distributed import as_completed

    keys = [f"{desc}-{i}-{uuid.uuid4().hex[:8]}" for i in range(len(items))]
    futures = client.map(fn, items, key=keys, retries=retries, pure=False, **kwargs)
    with tqdm(total=len(items) + already_done, initial=already_done, desc=desc, unit=unit) as bar:
        try:
            for future in as_completed(futures):
                future.result()  # re-raises the task's error after its retries
                bar.update(1)
        except BaseException:
            client.cancel(futures)
            raise
    return [f.result() for f in futures]


def summarize(stage: str, marks: list[dict], seconds: float, config: dict | None) -> dict:
    """Sum per-shard marks into the stage's `_stats.json` content."""
    reasons: collections.Counter = collections.Counter()
    counters: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for m in marks:
        reasons.update(m["reasons"])
        for name, counts in m["counters"].items():
            counters[name].update(counts)
    rows_in = sum(m["rows_in"] for m in marks)
    return {
        "stage": stage,
        "shards": len(marks),
        "rows_in": rows_in,
        "rows_out": sum(m["rows_out"] for m in marks),
        "rows_rejected": sum(m["rows_rejected"] for m in marks),
        "reasons": dict(reasons.most_common()),
        "counters": {k: dict(v.most_common()) for k, v in counters.items()},
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows_in / seconds, 1) if seconds > 0 else None,
        "config": config or {},
    }


def format_summary(stats: dict) -> str:
    """A plain-text summary table of a stage's stats."""
    lines = [
        f"{stats['stage']} summary",
        f"  {'rows in':<28}{stats['rows_in']:>10}",
        f"  {'rows out':<28}{stats['rows_out']:>10}",
        f"  {'rows rejected':<28}{stats['rows_rejected']:>10}",
    ]
    for reason, n in stats["reasons"].items():
        lines.append(f"    {reason[:50]:<50}{n:>10}")
    for name, counts in stats["counters"].items():
        lines.append(f"  {name}")
        for value, n in list(counts.items())[:12]:
            lines.append(f"    {str(value)[:50]:<50}{n:>10}")
        if len(counts) > 12:
            lines.append(f"    ... {len(counts) - 12} more in _stats.json")
    lines.append(f"  {'seconds':<28}{stats['seconds']:>10.1f}")
    if stats.get("rows_per_second"):
        lines.append(f"  {'rows/s':<28}{stats['rows_per_second']:>10.1f}")
    return "\n".join(lines)


def load_stage(path, rejects: bool = False, columns: list[str] | None = None):
    """A stage folder's kept rows (or, with `rejects`, its rejected rows) as a Dask DataFrame; `.compute()` gives pandas."""
    import dask.dataframe as dd

    path = str(path)  # a str or a pathlib.Path
    folder = f"{path.rstrip('/')}/_rejects" if rejects else path
    fs, root = fsspec.core.url_to_fs(folder)
    if rejects and not fs.glob(f"{root.rstrip('/')}/{SHARD_GLOB}"):
        kept = list_shards(path)  # an empty frame with the stage's columns and a reason: this stage rejected nothing
        schema = shard_schema(kept[0])[0]
        import pandas as pd

        empty = schema.empty_table().to_pandas().assign(reason=pd.Series(dtype="string"))
        return dd.from_pandas(empty[columns] if columns else empty, npartitions=1)
    return dd.read_parquet(list_shards(folder), columns=columns)


def iter_captions(source: str):
    """Captions from a stage folder's `caption` column, or lines of a text file or folder of them."""
    from pathlib import Path

    path = Path(source)
    if path.is_dir() and list(path.glob("part-*.parquet")):
        for shard in list_shards(source):
            yield from (c for c in read_shard(shard, columns=["caption"]).column("caption").to_pylist() if c)
        return
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise BadInputError(f"{source}: expected a stage folder with a caption column or text files of captions")
    for file in files:
        yield from (line.strip() for line in file.read_text(errors="replace").splitlines() if line.strip())
