"""Shard files: listing, reading and atomic writing of a stage folder's Parquet shards, local or fsspec.

The bottom layer every stage, trainer and tool reads its input through: a corrupt, empty or
misnamed shard is bad input naming the file, never a traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import uuid
from collections.abc import Iterable
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dallekit.errors import BadInputError

SHARD_GLOB = "part-*.parquet"
SHARD_NAME = re.compile(r"part-(\d{1,9})\.parquet")


def list_shards(input_dir: str) -> list[str]:
    """Sorted full paths of the Parquet shards of a stage folder; bad input if there are none or one is misnamed."""
    fs, root = fsspec.core.url_to_fs(input_dir)
    if not fs.isdir(root):
        raise BadInputError(f"{input_dir}: not a folder of Parquet shards")
    paths = sorted(fs.glob(f"{root.rstrip('/')}/{SHARD_GLOB}"))
    if not paths:
        raise BadInputError(f"{input_dir}: no {SHARD_GLOB} shards found (is it a stage output folder?)")
    for p in paths:
        if not SHARD_NAME.fullmatch(p.rsplit("/", 1)[-1]):
            raise BadInputError(f"{p}: a shard name must be part-<number>.parquet")
        if fs.isdir(p):
            raise BadInputError(f"{p}: a folder where a Parquet shard was expected")
    return [fs.unstrip_protocol(p) for p in paths] if "://" in input_dir else paths


def shard_stem(path: str) -> str:
    """The name of a shard without folder and extension: part-00042."""
    return path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")


def shard_index(path: str) -> int:
    """The number in a shard's name."""
    return int(shard_stem(path).split("-", 1)[1])


def _unreadable(path: str, err: Exception) -> BadInputError:
    message = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    return BadInputError(f"{path}: not a readable Parquet shard ({message})")


def _is_local(fs, p: str) -> bool:
    """Whether a path is on this machine (read and written by Arrow itself); a folder there is bad input."""
    if not isinstance(fs, LocalFileSystem):
        return False
    if os.path.isdir(p):
        raise BadInputError(f"{p}: a folder where a Parquet shard was expected")
    return True


def read_shard(path: str, columns: list[str] | None = None) -> pa.Table:
    """Read one shard as an Arrow table; a corrupt or truncated file is bad input naming it."""
    fs, p = fsspec.core.url_to_fs(path)
    try:
        if _is_local(fs, p):  # Arrow's own file reads: through a Python file object they take twice as long in a busy Dask worker
            pf = pq.ParquetFile(p)
            missing = sorted(set(columns or []) - set(pf.schema_arrow.names))
            if missing:  # ParquetFile.read would leave them out where read_table refuses
                raise BadInputError(f"{path}: missing column(s) {', '.join(missing)}")
            return pf.read(columns=columns)
        with fs.open(p, "rb") as f:
            return pq.read_table(f, columns=columns)
    except (pa.ArrowException, FileNotFoundError, IsADirectoryError) as err:  # a disk error is not the file's fault: it propagates
        raise _unreadable(path, err) from None


def shard_schema(path: str) -> tuple[pa.Schema, int]:
    """A shard's Arrow schema and row count, from its footer alone; a file that is not Parquet is bad input."""
    fs, p = fsspec.core.url_to_fs(path)
    try:
        if _is_local(fs, p):
            pf = pq.ParquetFile(p)
            return pf.schema_arrow, pf.metadata.num_rows
        with fs.open(p, "rb") as f:
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata.num_rows
    except (pa.ArrowException, FileNotFoundError, IsADirectoryError) as err:
        raise _unreadable(path, err) from None


def open_shard(path: str) -> pq.ParquetFile:
    """A shard as a ParquetFile, to read a row group at a time (see `read_row_group`); a file that is not Parquet is bad input."""
    fs, p = fsspec.core.url_to_fs(path)
    try:
        return pq.ParquetFile(p) if _is_local(fs, p) else pq.ParquetFile(fs.open(p, "rb"))
    except (pa.ArrowException, FileNotFoundError, IsADirectoryError) as err:
        raise _unreadable(path, err) from None


def read_row_groups(shard: pq.ParquetFile, path: str, groups: list[int], columns: list[str]) -> pa.Table:
    """Some row groups of an open shard, as one table; a corrupt one, or one without the columns asked for, is bad input naming the file."""
    missing = sorted(set(columns or []) - set(shard.schema_arrow.names))
    if missing:  # as read_shard: Arrow's KeyError would be a traceback
        raise BadInputError(f"{path}: missing column(s) {', '.join(missing)}")
    try:
        return shard.read_row_groups(groups, columns=columns)
    except pa.ArrowException as err:
        raise _unreadable(path, err) from None


# What a stage's columns must hold, by name: a wrong type is bad input, not a traceback in a task.
COLUMN_KINDS = {
    "uid": ("string", pa.types.is_string), "url": ("string", pa.types.is_string), "caption": ("string", pa.types.is_string),
    "status": ("string", pa.types.is_string), "sha256": ("string", pa.types.is_string), "jpg": ("binary", pa.types.is_binary),
    "original_width": ("integer or float", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)),
    "original_height": ("integer or float", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)),
}


def check_columns(paths: list[str], required: set[str], expected: str) -> list[tuple[pa.Schema, int]]:
    """Every shard's schema and row count; bad input naming the shard if a required column is missing or of the wrong type."""
    schemas = []
    for path in paths:
        schema, rows = shard_schema(path)
        missing = required - set(schema.names)
        if missing:
            raise BadInputError(f"{path}: missing column(s) {', '.join(sorted(missing))} (expected {expected})")
        for name in sorted(required & COLUMN_KINDS.keys()):
            kind, fits = COLUMN_KINDS[name]
            if not (fits(schema.field(name).type) or pa.types.is_null(schema.field(name).type)):
                raise BadInputError(f"{path}: column {name} holds {schema.field(name).type}, expected {kind} (expected {expected})")
        schemas.append((schema, rows))
    return schemas


BLOB_ROW_GROUP = 256  # rows a row group of an image shard holds at most (about 5 MB of 256 px JPEGs)


def parquet_options(schema: pa.Schema, **given: Any) -> dict:
    """pq.write_table's options for a table: the caller's, with binary columns (encoded images, thumbnails) and vectors stored plain.

    JPEG, PNG and WebP bytes are compressed already: snappy finds nothing to shrink in them but
    costs a writer about as much as the write itself, a dictionary of whole images never pays
    off, and min/max statistics of images would copy two of them into the footer per row group.
    The other columns keep the caller's codec (snappy unless given), dictionaries and statistics.
    """
    blobs = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
             or pa.types.is_fixed_size_binary(f.type)  # thumbnails (clean's signature) do not compress either
             or _is_vector(f.type)]  # nor do embeddings, and a dictionary of them made reading them 3x slower
    if not blobs:
        return given
    others = [name for name in schema.names if name not in blobs]
    codec = given.get("compression", "snappy")
    if not isinstance(codec, dict):
        codec = {name: codec for name in others} | {name: "none" for name in blobs}
    # row groups of a few MB of images: a reader of some rows (search's hits, a notebook's sample) reads their groups, not the shard
    bounded = {"row_group_size": BLOB_ROW_GROUP} if "jpg" in blobs else {}
    return {"use_dictionary": others, "write_statistics": others} | bounded | given | {"compression": codec}


def _is_vector(kind: pa.DataType) -> bool:
    """A fixed-size list of floats: a vector column (embed's CLIP embeddings)."""
    return pa.types.is_fixed_size_list(kind) and pa.types.is_floating(kind.value_type)


@contextlib.contextmanager
def naming_file(path: str):
    """Re-raise an OSError that names no file (pyarrow's and a full disk's do not) with `path` as its file."""
    try:
        yield
    except OSError as err:
        if err.filename or err.errno is None:
            raise
        raise OSError(err.errno, os.strerror(err.errno), path) from None


_WRITTEN: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("dallekit_written", default=None)


@contextlib.contextmanager
def collect_written():
    """Collect the paths every `commit_file` in this context commits (the resumable-pass engine vouches for them)."""
    written: list[str] = []
    token = _WRITTEN.set(written)
    try:
        yield written
    finally:
        _WRITTEN.reset(token)


def _fsync_path(path: str, directory: bool = False) -> None:
    """Flush a local file's or folder's data to disk (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(fs: Any, tmp: str, path: str) -> None:
    """Make a fully written temporary file the file at `path`: fsync it, rename it into place, fsync the folder.

    After this returns the file survives a power loss whole, so a mark written next never vouches
    for a file that is empty on disk. The path is recorded for the engine (see `collect_written`).
    """
    target = fsspec.core.url_to_fs(path)[1]
    if isinstance(fs, LocalFileSystem):
        _fsync_path(tmp)
        os.replace(tmp, target)
        _fsync_path(os.path.dirname(target) or ".", directory=True)
    else:
        fs.mv(tmp, target)
    written = _WRITTEN.get()
    if written is not None:
        written.append(path)


def write_table_atomic(table: pa.Table, path: str, **parquet_kwargs: Any) -> None:
    """Write a Parquet file under a temporary name beside the target and rename it into place."""
    write_tables_atomic([table], path, **parquet_kwargs)


def write_tables_atomic(tables: Iterable[pa.Table], path: str, **parquet_kwargs: Any) -> int:
    """Write tables of one schema into one Parquet file as they come (the first gives the schema), atomically; returns the rows.

    A caller that produces its rows in batches holds one batch at a time, not the file's rows.
    """
    fs, p = fsspec.core.url_to_fs(path)
    parent, name = p.rsplit("/", 1)
    tmp = f"{parent}/_tmp-{uuid.uuid4().hex}-{name}"  # `_` keeps readers from listing it
    with naming_file(path):
        fs.makedirs(parent, exist_ok=True)
        rows = _write_parquet(tables, fs, tmp, path, parquet_kwargs)
        commit_file(fs, tmp, path)
    return rows


def _write_parquet(tables: Iterable[pa.Table], fs: Any, tmp: str, path: str, parquet_kwargs: dict) -> int:
    """Write the tables into the file `tmp` as row groups; removes it on any failure; returns the rows."""
    local = isinstance(fs, LocalFileSystem)
    rows, writer, sink = 0, None, None
    try:
        for table in tables:
            if writer is None:
                options = parquet_options(table.schema, **parquet_kwargs)
                row_group_size = options.pop("row_group_size", None)
                sink = tmp if local else fs.open(tmp, "wb")
                writer = pq.ParquetWriter(sink, table.schema, **options)
            writer.write_table(table, row_group_size=row_group_size)
            rows += table.num_rows
        if writer is None:
            raise ValueError(f"{path}: no table to write (a writer needs at least one, empty or not, for the schema)")
        writer.close()
        if not local:
            sink.close()
    except BaseException:
        if writer is not None:
            writer.close()
            if not local:
                sink.close()
            fs.rm(tmp)
        raise
    return rows


@contextlib.contextmanager
def atomic_file(path: str):
    """A binary file to write that becomes `path` (fsynced, renamed, folder fsynced: `commit_file`) only when the block ends without error.

    For files that are not Parquet (tars, Arrow IPC): it is written under a temporary name beside
    the target, which an error removes, so a reader never sees a partial file.
    """
    fs, p = fsspec.core.url_to_fs(path)
    parent, name = p.rsplit("/", 1)
    tmp = f"{parent}/_tmp-{uuid.uuid4().hex}-{name}"  # `_` keeps readers from listing it
    with naming_file(path):
        fs.makedirs(parent, exist_ok=True)
        try:
            with fs.open(tmp, "wb") as f:
                yield f
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise
        commit_file(fs, tmp, path)


def write_rows_file(column: pa.Array, path: str) -> None:
    """One fixed-size binary column as an uncompressed Arrow IPC file (written atomically), for `take_rows`."""
    table = pa.table({"value": column})
    with atomic_file(path) as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)


def read_rows_file(path: str) -> pa.Array:
    """The column of a `write_rows_file` file; a local file is memory-mapped (the rows a caller takes are the pages read)."""
    fs, p = fsspec.core.url_to_fs(path)
    if _is_local(fs, p):
        column = pa.ipc.open_file(pa.memory_map(p)).read_all().column("value")
    else:
        with fs.open(p, "rb") as f:
            column = pa.ipc.open_file(pa.py_buffer(f.read())).read_all().column("value")
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # one chunk: no copy of the mapped file


def take_rows(path: str, rows: Any) -> np.ndarray:
    """Rows of a `write_rows_file` file as an (n, width) uint8 array, nulls as zeros: a few rows of many files read cheaply."""
    column, rows = read_rows_file(path), np.asarray(rows, np.int64)
    width = column.type.byte_width
    values = np.frombuffer(column.buffers()[1], np.uint8).reshape(-1, width)[column.offset : column.offset + len(column)]
    out = values[rows]
    if column.null_count:
        out[~column.is_valid().to_numpy(zero_copy_only=False)[rows]] = 0
    return out


def write_json_atomic(obj: Any, path: str) -> None:
    """Write JSON to a unique temporary name, fsync it and rename it into place (the one atomic JSON writer)."""
    fs, p = fsspec.core.url_to_fs(path)
    tmp = f"{p}.{uuid.uuid4().hex}.tmp"
    with naming_file(path):
        parent = p.rsplit("/", 1)[0]
        if parent and not fs.exists(parent):
            fs.makedirs(parent, exist_ok=True)
        with fs.open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
        commit_file(fs, tmp, path)


def file_checksum(path: str) -> str:
    """A file's xxh3-128 checksum ("xxh3_128:<hex>"), read in 256 KiB blocks: at ~15 GB/s, 9x sha256, so a shard is hashed as it is written."""
    import xxhash

    fs, p = fsspec.core.url_to_fs(path)
    digest = xxhash.xxh3_128()
    buffer = bytearray(1 << 18)  # one buffer read into again and again: a task's memory does not grow by a block per read
    view = memoryview(buffer)
    with fs.open(p, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return f"xxh3_128:{digest.hexdigest()}"


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
        shards = list_shards(source)
        check_columns(shards, {"caption"}, "a stage folder with a caption column")
        for shard in shards:
            yield from (c for c in read_shard(shard, columns=["caption"]).column("caption").to_pylist() if c)
        return
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise BadInputError(f"{source}: expected a stage folder with a caption column or text files of captions")
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise BadInputError(f"{file}: not UTF-8 text near byte {err.start}; expected one caption per line") from None
        yield from (line.strip() for line in text.splitlines() if line.strip())
