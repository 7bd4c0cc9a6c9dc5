"""adopt: an existing img2dataset output folder -> a download-stage folder that `clean` reads, with no re-download.

img2dataset writes one `NNNNN.parquet` per shard in each of its output formats:

- `parquet`: the rows with the image bytes in a `jpg` (or `png`, `webp`) column;
- `webdataset`: `NNNNN.tar` holds `key.jpg`, `key.txt` and `key.json` of the successes, and
  `NNNNN.parquet` the metadata of every row, failed ones included;
- `files`: `NNNNN/key.jpg` and friends, with the same metadata Parquet.

One Dask task per input shard reads its metadata and its images and writes `part-NNNNN.parquet`
in download's layout: `uid` (ingest's hash of url and caption), `url`, `caption`, the other
columns img2dataset kept (`key`, `status`, `error_message`, sizes, `exif`, `sha256`, extra
columns), then the image bytes in `jpg`. Rows are in key order (img2dataset writes them in
completion order). `sha256` is computed from the stored bytes when the folder has none.

Adopt drops nothing it was given: failed rows keep img2dataset's status and message, and an
image that is missing, not a regular file, larger than `--max-image-bytes` or one of two images
of its key turns its row into `failed_to_download` with an `adopt: ...` message. Images are
never decoded here (clean does that), but each header is read: an image of more than
`--max-image-area` pixels keeps its row as `failed_to_resize` with download's `image_too_large:
WxH ...` message. Rejected are only a URL repeated across the folder (`duplicate_url`, like
ingest, found by the same passes, `url_dedup`, in the stage's scratch folder, so no task holds more
than a bucket of URLs), a row with no URL (`empty_url`) and, in the webdataset and files layouts where images are
found by key, the rows of a key a shard repeats (`duplicate_key`). Tar members and files that no
row names are counted (`unmatched_tar_members`, `unmatched_files`). Text that is not UTF-8 is
repaired with U+FFFD and counted (`utf8_repaired`).

A task holds a shard's metadata (no binary column) and one slice of its images at a time: the
rows in key order are cut into slices of about SLICE_BYTES image bytes (sizes from the Parquet
row groups, the tar headers or the folder listing), each slice's images are gathered (the row
groups it falls in, or a tar member or file at a time; nothing is extracted to disk), checked
and written as row groups of the output shard (`io.write_tables_atomic`), so a task's memory
does not grow with its shard.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import re
import tarfile
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.config import AdoptConfig, output_options
from dallekit.errors import BadInputError
from dallekit.images import ImageTooLarge, UndecodableImage, check_decode_size
from dallekit.io import check_columns, open_shard, read_row_groups, read_shard, shard_schema
from dallekit.pipeline.download import status_counters
from dallekit.pipeline.ingest import RESERVED, make_uid
from dallekit.pipeline.passes import run_pass, work_dir
from dallekit.pipeline.shards import ShardResult, ShardTask, shard_name, top_counts
from dallekit.pipeline.stage import Plan, Stage, run_plan
from dallekit.pipeline.url_dedup import find_repeats, orders, write_url_parts

UNMATCHED = {"webdataset": "unmatched_tar_members", "files": "unmatched_files"}  # _stats.json counters of what no row names
SHARD = re.compile(r"(\d{1,9})\.parquet")  # img2dataset's shard names: 00000.parquet
KEY = re.compile(r"\d{1,20}")  # img2dataset's keys: shard id and row number, zero-padded digits
IMAGE_COLUMNS = ("jpg", "png", "webp")  # img2dataset's --encode_format values
MEMBER = re.compile(r"(\d{1,20})\.(jpg|jpeg|png|webp)")  # the image members of a tar or files folder
ROWS_PER_BUCKET = 2_000_000  # URLs per dedup bucket: bounds a bucket task's memory
SCAN_ROWS_PER_TASK = 250_000  # metadata rows (url, caption, key) one scan or regroup task reads: about 50 MB
# img2dataset's own columns, in its order; the input's other columns come before them, as in its output
IMG2DATASET_COLUMNS = ("key", "status", "error_message", "width", "height", "original_width", "original_height", "exif")
NO_CAPTION = "no caption column (expected an img2dataset output made with --caption_col)"


@dataclass(frozen=True)
class AdoptShard:
    """One adopt task: the metadata Parquet, where its images are, and its position (for the URL dedup)."""

    path: str  # NNNNN.parquet
    layout: str  # parquet, webdataset or files
    index: int  # position in the folder's sorted shards: the dedup's block number
    config: AdoptConfig


def _fs(path: str):
    return fsspec.core.url_to_fs(path)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def shard_index(path: str) -> int:
    """img2dataset's shard number, from 00042.parquet: the output shard keeps it (part-00042)."""
    return int(path.rsplit("/", 1)[-1].removesuffix(".parquet"))


def _file_state(fs, path: str) -> tuple[int, str | None]:
    """A file's size and modification time: an edit of the same size changes the time."""
    info = fs.info(path)
    value = info.get("mtime") or info.get("LastModified")
    return info["size"], str(value) if value is not None else None


def _companion_state(fs, path: str, layout: str) -> tuple:
    """What identifies a shard's images: the tar's size and time, or each image file's name and size (with the folder's newest time)."""
    if layout == "webdataset":
        return _file_state(fs, _companion(path, layout))
    if layout == "files":
        folder = _companion(path, layout)
        if not fs.isdir(folder):
            return (None,)
        if _is_local(fs):  # one listing: names, sizes and times of every image file
            with os.scandir(folder) as entries:
                files = sorted((e.name, e.stat(follow_symlinks=False).st_size, e.stat(follow_symlinks=False).st_mtime_ns)
                               for e in entries if e.is_file(follow_symlinks=False))
        else:
            files = sorted((e["name"].rsplit("/", 1)[-1], e["size"], str(e.get("LastModified") or e.get("mtime")))
                           for e in fs.ls(folder, detail=True) if e.get("type") == "file")
        return (hashlib.sha256(repr(files).encode()).hexdigest()[:16],)
    return ()


def _companion(path: str, layout: str) -> str:
    """The tar or image folder of a metadata shard."""
    return path.removesuffix(".parquet") + (".tar" if layout == "webdataset" else "")


def list_img2dataset_shards(input_dir: str) -> list[str]:
    """The metadata shards (NNNNN.parquet) of an img2dataset output folder, sorted; bad input if there are none or one escapes."""
    fs, root = _fs(input_dir)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise BadInputError(f"{input_dir}: no such folder (expected an img2dataset output folder)")
    paths = sorted(p for p in fs.glob(f"{root}/*.parquet") if SHARD.fullmatch(p.rsplit("/", 1)[-1]))
    if not paths:
        raise BadInputError(f"{input_dir}: no img2dataset shards (00000.parquet, ...) found")
    if _is_local(fs):
        real_root = os.path.realpath(root)
        for p in paths:  # a symlinked shard must not lead out of the folder it was given
            if os.path.dirname(os.path.realpath(p)) != real_root or not os.path.isfile(p):
                raise BadInputError(f"{p}: a link or entry leading outside {input_dir}; expected a Parquet file of the folder itself")
    return [fs.unstrip_protocol(p) for p in paths] if "://" in input_dir else paths


def detect_layout(input_dir: str, paths: list[str], layout: str) -> str:
    """The output format img2dataset wrote (or the one given), checked: every shard has its tar or image folder."""
    fs, _ = _fs(input_dir)
    first = _companion(paths[0], "webdataset")
    if layout == "auto":
        layout = "webdataset" if fs.exists(first) else ("files" if fs.isdir(_companion(paths[0], "files")) else "parquet")
    for p in paths:
        companion = _companion(p, layout)
        local = _fs(companion)[1]  # without file://, so the link checks see the real path
        if layout == "webdataset" and not fs.isfile(companion):
            raise BadInputError(f"{companion}: missing (expected img2dataset's webdataset tar beside {p})")
        if layout == "files" and not fs.isdir(companion):
            raise BadInputError(f"{companion}: missing (expected img2dataset's image folder beside {p})")
        beside = os.path.dirname(os.path.realpath(_fs(p)[1]))
        if _is_local(fs) and layout != "parquet" and (os.path.islink(local) or os.path.dirname(os.path.realpath(local)) != beside):
            raise BadInputError(f"{companion}: a symlink; expected img2dataset's own {'tar' if layout == 'webdataset' else 'folder'}")
    return layout


def check_metadata(paths: list[str], layout: str) -> list[int]:
    """Rows per shard, from the footers; bad input naming the shard when a column img2dataset writes is missing or mistyped."""
    rows = []
    for path, (schema, n) in zip(paths, check_columns(paths, {"url", "key", "status"}, "an img2dataset output shard")):
        if "caption" not in schema.names:
            raise BadInputError(f"{path}: {NO_CAPTION}")
        for name in ("url", "key", "status"):  # img2dataset always fills these (a shard with no rows has nothing to fill)
            if pa.types.is_null(schema.field(name).type) and n:
                raise BadInputError(f"{path}: column {name} holds only nulls, expected strings (img2dataset's own column)")
        for name in ("caption", "key", "error_message", "sha256"):
            field = schema.field(name) if name in schema.names else None
            text = (pa.types.is_string, pa.types.is_null) + ((pa.types.is_binary, pa.types.is_large_binary) if name == "caption" else ())
            if field is not None and not any(is_text(field.type) for is_text in text):  # caption bytes are decoded as UTF-8
                raise BadInputError(f"{path}: column {name} holds {field.type}, expected string (img2dataset's own column)")
        images = [c for c in IMAGE_COLUMNS if c in schema.names]
        if layout == "parquet" and not images:
            raise BadInputError(f"{path}: no image column ({', '.join(IMAGE_COLUMNS)}); expected img2dataset's parquet output, "
                                "or pass --format webdataset or files")
        if layout == "parquet" and not pa.types.is_binary(schema.field(images[0]).type) and not pa.types.is_large_binary(schema.field(images[0]).type):
            raise BadInputError(f"{path}: column {images[0]} holds {schema.field(images[0]).type}, expected binary image bytes")
        rows.append(n)
    return rows


SLICE_BYTES = 32 * 2**20  # image bytes one task gathers, checks and writes at a time (held about 5 times): memory does not grow with the shard


def _string_columns(table: pa.Table) -> pa.Table:
    """img2dataset's string columns as strings even when a writer left them all null (a 0-row shard from pandas)."""
    for name in ("url", "caption", "key", "status", "error_message", "sha256"):
        if name in table.column_names and pa.types.is_null(table.schema.field(name).type):
            table = table.set_column(table.column_names.index(name), name, table.column(name).cast(pa.string()))
    return table


def _big_columns(schema: pa.Schema) -> list[str]:
    """The binary columns (images, in any layout; not a caption kept as bytes): read a slice at a time, never as a whole shard."""
    return [f.name for f in schema if (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)) and f.name != "caption"]


def _repair_utf8(table: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """Text columns as valid UTF-8: bytes that are not (a caption stored as bytes, a writer that did not check) decoded with
    U+FFFD in place of each bad sequence, as a reader expects (clean repairs captions further); returns the values repaired per column."""
    repaired = {}
    for i, field in enumerate(table.schema):
        column = table.column(i)
        if pa.types.is_string(field.type):
            try:
                column.validate(full=True)
                continue
            except pa.ArrowInvalid:  # invalid UTF-8 somewhere
                column = column.cast(pa.binary())
        elif not (field.name == "caption" and (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type))):
            continue
        raw = column.to_pylist()
        text = [None if b is None else b.decode("utf-8", "replace") for b in raw]
        repaired[field.name] = sum(t is not None and t.encode() != b for t, b in zip(text, raw))
        table = table.set_column(i, field.name, pa.array(text, pa.string()))
    return table, {k: v for k, v in repaired.items() if v}


def _metadata(path: str, columns: list[str] | None = None) -> tuple[pa.Table, np.ndarray, dict[str, int]]:
    """A shard's rows without their binary columns in key order (img2dataset writes them as downloads complete), url
    stripped as ingest does, text repaired to UTF-8; each row's position in the file; the values repaired per column."""
    schema = shard_schema(path)[0]
    big = _big_columns(schema)
    table, repaired = _repair_utf8(_string_columns(read_shard(path, columns=[c for c in (columns or schema.names) if c not in big])))
    order = pc.sort_indices(table, [("key", "ascending")])  # stable: scan and adopt number the rows alike
    table = table.combine_chunks().take(order)  # one chunk: a chunked take is 10x slower
    url = pc.utf8_trim_whitespace(table.column("url"))
    return table.set_column(table.column_names.index("url"), "url", url), order.to_numpy(), repaired


class BinaryColumns:
    """A shard's binary columns, read a row group at a time: a task holds the rows of one slice and one row group, never the shard's."""

    def __init__(self, path: str, names: list[str]):
        self.path, self.names = path, names
        self.file = open_shard(path)
        self._last: tuple[tuple[int, ...], pa.Table] | None = None  # the row groups read last: the next slice often needs them again
        meta = self.file.metadata
        rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.starts = np.cumsum([0, *rows])
        where = {meta.row_group(0).column(j).path_in_schema: j for j in range(meta.num_columns)} if rows else {}
        # bytes per row in each row group (Parquet's own sizes), to cut slices before anything is read
        self.per_row = np.array([sum(meta.row_group(g).column(where[n]).total_uncompressed_size for n in names) / max(1, rows[g])
                                 for g in range(len(rows))], dtype=np.float64)

    def _read(self, groups: list[int]) -> pa.Table:
        """The binary columns of these row groups, read again only when the last read was of others.

        A shard written as one row group (pandas' default) is then read once, not once a slice;
        such a task holds that row group, since Parquet reads no less.
        """
        if self._last is None or self._last[0] != tuple(groups):
            self._last = None  # let the old row groups go before the new ones are read
            self._last = (tuple(groups), read_row_groups(self.file, self.path, groups, self.names))
        return self._last[1]

    def row_bytes(self, positions: np.ndarray) -> np.ndarray:
        """The estimated bytes of each row, from its row group's sizes."""
        if not len(positions):
            return np.zeros(0)
        return self.per_row[np.searchsorted(self.starts, positions, side="right") - 1]

    def take(self, positions: np.ndarray) -> dict[str, pa.Array | pa.ChunkedArray]:
        """The binary columns' values at `positions` (input row numbers), in that order.

        The row groups they fall in are read together (Arrow's threads) in batches of at most SLICE_BYTES,
        so rows in a completion order far from key order cost more reads, not more memory.
        """
        schema = self.file.schema_arrow
        if not len(positions):
            return {n: pa.array([], schema.field(n).type) for n in self.names}
        groups = np.searchsorted(self.starts, positions, side="right") - 1
        sizes = self.per_row * (self.starts[1:] - self.starts[:-1])
        batches, batch, total = [], [], 0.0
        for g in np.unique(groups).tolist():
            if batch and total + sizes[g] > SLICE_BYTES:
                batches.append(batch)
                batch, total = [], 0.0
            batch.append(g)
            total += sizes[g]
        batches.append(batch)
        pieces: dict[str, list] = {n: [] for n in self.names}
        where = []  # the slice rows each batch gives, in the order they come
        for batch in batches:
            table = self._read(batch)
            first = dict(zip(batch, np.cumsum([0, *(self.starts[g + 1] - self.starts[g] for g in batch[:-1])]).tolist()))
            mine = np.nonzero(np.isin(groups, batch))[0]
            local = pa.array([first[g] + p - self.starts[g] for g, p in zip(groups[mine].tolist(), positions[mine].tolist())], pa.int64())
            for n in self.names:
                pieces[n].append(table.column(n).take(local))
            where.append(mine)
        if len(batches) == 1:  # taken in the slice's order already: no copy more
            return {n: pieces[n][0] for n in self.names}
        back = pa.array(np.argsort(np.concatenate(where), kind="stable"), pa.int64())
        return {n: pa.chunked_array([c for piece in pieces[n] for c in piece.chunks], schema.field(n).type).take(back) for n in self.names}


def _cut(sizes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) ranges of rows whose sizes sum to at most `budget`, one row at least."""
    ranges, start, total = [], 0, 0.0
    for i, size in enumerate(sizes.tolist()):
        if i > start and total + size > budget:
            ranges.append((start, i))
            start, total = i, 0.0
        total += size
    ranges.append((start, len(sizes)))
    return ranges


def scan_shards(group: list[AdoptShard], work_dir: str, n_buckets: int) -> dict:
    """Prepare pass 1 for a group of shards (one Dask task: each shard's part is small): their URLs in one file of a stream
    per bucket; returns their rows and that file's index."""
    scanned = [scan_shard(task) for task in group]
    urls = pa.concat_tables([table for table, _ in scanned])
    parts = write_url_parts(urls, n_buckets, work_dir, f"g-{group[0].index:06d}")
    return {"rows": sum(n for _, n in scanned), "parts": {"urls": parts}}


def _groups(tasks: list[AdoptShard], rows: list[int]) -> list[list[AdoptShard]]:
    """Consecutive shards of about SCAN_ROWS_PER_TASK rows: a task per shard would cost more in scheduling than in work."""
    groups: list[list[AdoptShard]] = [[]]
    filled = 0
    for task, n in zip(tasks, rows):
        if groups[-1] and filled + n > SCAN_ROWS_PER_TASK:
            groups.append([])
            filled = 0
        groups[-1].append(task)
        filled += n
    return groups


def scan_shard(task: AdoptShard) -> tuple[pa.Table, int]:
    """The (url, uid, _order) of one shard's rows that take part in the repeated-URL check, and its row count."""
    table = _metadata(task.path, ["key", "url", "caption"])[0]
    keys, url = table.column("key"), table.column("url")
    repeated = repeated_keys(keys.to_pylist(), task.layout)
    # rows rejected as empty_url or duplicate_key take no part: the first of a URL kept is one that can be kept
    valid = pc.fill_null(pc.not_equal(url, ""), False)
    if repeated:
        valid = pc.and_(valid, pc.invert(pc.is_in(keys, value_set=pa.array(list(repeated), keys.type))))
    part = table.append_column("_order", pa.array(orders(task.index, table.num_rows))).filter(valid)
    uids = [make_uid(u, c or "") for u, c in zip(part.column("url").to_pylist(), part.column("caption").to_pylist())]
    return pa.table({"url": part.column("url"), "uid": pa.array(uids, pa.string()), "_order": part.column("_order")}), table.num_rows


def _regular_files(fs, folder: str) -> dict[str, int]:
    """name -> size of the regular files in one image folder (links and anything else left out)."""
    if _is_local(fs):
        with os.scandir(folder) as entries:
            return {e.name: e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False)}
    return {p["name"].rsplit("/", 1)[-1]: p["size"] for p in fs.ls(folder, detail=True) if p.get("type") == "file"}


@dataclass
class StoredImages:
    """Where the images of a webdataset or files shard are, by key, read a slice at a time."""

    task: AdoptShard
    found: dict[str, tuple[str, int, int]]  # key -> (file, offset, size): the tar's member data or the image file
    problems: dict[str, str]  # key -> why its image cannot be taken
    unmatched: collections.Counter  # members (or files) that no metadata row names, by extension: not rows, so never rejects

    def row_bytes(self, keys: list) -> np.ndarray:
        """The stored size of each key's image (0 where none)."""
        return np.array([self.found[k][2] if k in self.found else 0 for k in keys], dtype=np.float64)

    def read(self, keys: list) -> list[bytes | None]:
        """The images of `keys`, in that order (None where a key has none)."""
        fs, _ = _fs(self.task.path)
        out: list[bytes | None] = [None] * len(keys)
        wanted = sorted((self.found[k], i) for i, k in enumerate(keys) if k in self.found)  # in file order: one forward pass
        if self.task.layout == "webdataset" and wanted:
            with fs.open(wanted[0][0][0], "rb") as f:
                for (name, offset, size), i in wanted:
                    f.seek(offset)
                    out[i] = f.read(size)
                    if len(out[i]) < size:  # cut short since it was indexed
                        raise BadInputError(f"{name}: the tar ends inside a member; expected img2dataset's webdataset shard")
            return out
        for (name, _, size), i in wanted:
            with fs.open(name, "rb") as f:
                data = f.read(size + 1)  # its listed size: a read of the limit would allocate the limit for every image
            if len(data) != size:  # it changed since it was listed
                self.problems[keys[i]] = f"adopt: {name.rsplit('/', 1)[-1]} changed size while adopt read it"
            else:
                out[i] = data
        return out


def _extension(name: str) -> str:
    """A member's extension for the unmatched counter: img2dataset's own kinds, the rest as other."""
    extension = name.rsplit(".", 1)[-1] if "." in name else ""
    return extension if extension in ("jpg", "jpeg", "png", "webp", "txt", "json") else "other"


def _index_files(task: AdoptShard, keys: set[str], named: set) -> StoredImages:
    """The images of a files shard (`keys`): its folder listed once, nothing read; what no row (`named`) names is counted."""
    fs, _ = _fs(task.path)
    _, folder = _fs(_companion(task.path, task.layout))
    limit = task.config.max_image_bytes
    found, problems, unmatched = {}, {}, collections.Counter()
    for name, size in sorted(_regular_files(fs, folder).items()):
        if name.split(".", 1)[0] not in named:
            unmatched[_extension(name)] += 1
        member = MEMBER.fullmatch(name)
        if member and member.group(1) in keys:
            problem = f"adopt: {name} is {size} bytes, more than --max-image-bytes {limit}" if size > limit else None
            _note_image(found, problems, member.group(1), name, (f"{folder}/{name}", 0, size), problem)
    return StoredImages(task, found, problems, unmatched)


def _note_image(found: dict, problems: dict, key: str, name: str, place: tuple[str, int, int], problem: str | None) -> None:
    """Record where a wanted key's image is, or why it cannot be taken; a second image of one key makes both unusable."""
    if key in found or key in problems:  # 1.jpg and 1.png, or one member twice: which is the row's picture is unknown
        found.pop(key, None)
        problems[key] = f"adopt: key {key} has more than one image ({name} and another); which one is its row's is unknown"
    elif problem:
        problems[key] = problem
    else:
        found[key] = place


def _index_tar(task: AdoptShard, keys: set[str], named: set) -> StoredImages:
    """Where each key's image (`keys`) lies in a webdataset tar: its headers read once (data skipped), nothing extracted;
    the members no row (`named`) names are counted."""
    fs, _ = _fs(task.path)
    limit = task.config.max_image_bytes
    companion = _companion(task.path, task.layout)
    found, problems, unmatched = {}, {}, collections.Counter()
    try:
        with fs.open(companion, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            while (member := tar.next()) is not None:  # links and devices are never followed
                tar.members.clear()  # headers one at a time: a big tar's member list is not kept
                if member.name.split(".", 1)[0] not in named:
                    unmatched[_extension(member.name)] += 1
                image = MEMBER.fullmatch(member.name)
                if not image or image.group(1) not in keys:
                    continue
                problem = (f"adopt: {member.name} in the tar is not a regular file" if not member.isreg() or member.issparse() else
                           f"adopt: {member.name} is {member.size} bytes, more than --max-image-bytes {limit}" if member.size > limit else None)
                _note_image(found, problems, image.group(1), member.name, (companion, member.offset_data, member.size), problem)
    except (tarfile.TarError, EOFError) as err:  # a disk error is not the file's fault: it propagates
        raise BadInputError(f"{companion}: not a readable tar ({str(err) or type(err).__name__}); expected img2dataset's webdataset shard") from None
    return StoredImages(task, found, problems, unmatched)


def _image_problem(task: AdoptShard, key, image, stored: StoredImages | None) -> tuple[str, str] | None:
    """(status, message) for a success row whose image cannot be kept (its row then fails), or None."""
    limit = task.config.max_image_bytes
    if stored is None:  # parquet: the bytes were in the row
        if image is None:
            return "failed_to_download", f"adopt: no image bytes for key {str(key)[:40]} in its image column"
        if len(image) > limit:
            return "failed_to_download", f"adopt: image of key {str(key)[:40]} is {len(image)} bytes, more than --max-image-bytes {limit}"
    elif not (isinstance(key, str) and KEY.fullmatch(key)):
        return "failed_to_download", f"adopt: key {str(key)[:40]!r} is not img2dataset's numeric key"
    elif image is None:
        return "failed_to_download", stored.problems.get(key, f"adopt: no image for key {key} in {os.path.basename(_companion(task.path, task.layout))}")
    try:  # the header only, as download's resizer does before it decodes: clean would decode the image whole
        check_decode_size(image, task.config.max_image_area)
    except ImageTooLarge as err:
        return "failed_to_resize", str(err)
    except UndecodableImage:  # not an image at all: clean finds it and rejects it as undecodable
        pass
    return None


def _views(column: pa.Array | pa.ChunkedArray) -> list[memoryview | None]:
    """Each value of a binary column as a view of Arrow's bytes (None for nulls): no copy, and no scalar per value."""
    views: list[memoryview | None] = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        _, offsets, data = chunk.buffers()
        ends = np.frombuffer(offsets, np.int32, len(chunk) + 1, chunk.offset * 4).tolist() if len(chunk) else [0]
        data = memoryview(data).cast("B") if data is not None else memoryview(b"")
        valid = chunk.is_valid().to_pylist() if chunk.null_count else [True] * len(chunk)
        views.extend(data[a:b] if ok else None for a, b, ok in zip(ends, ends[1:], valid))
    return views


def _adopt_slice(task: AdoptShard, part: pa.Table, jpg: pa.Array, stored: StoredImages | None) -> pa.Table:
    """A slice of a shard's rows (metadata and binary columns) in download's layout, before the URL rejects."""
    keys = part.column("key").to_pylist()
    statuses = part.column("status").to_pylist()
    messages = part.column("error_message").to_pylist() if "error_message" in part.column_names else [None] * len(keys)
    jpg = jpg.cast(pa.binary())
    images = _views(jpg)
    changed = False
    for i, (key, status, image) in enumerate(zip(keys, statuses, images)):
        problem = _image_problem(task, key, image, stored) if status == "success" else None
        if problem:
            statuses[i], messages[i] = problem
            changed = True
    if changed:
        jpg = pc.if_else(pc.equal(pa.array(statuses, pa.string()), "success"), jpg, pa.scalar(None, pa.binary()))
    old = part.column("sha256").to_pylist() if "sha256" in part.column_names else [None] * len(keys)
    # img2dataset's hash (of the downloaded bytes) is kept; only a missing one is computed, from the stored bytes
    sha = [(h or hashlib.sha256(image).hexdigest()) if s == "success" else None for h, s, image in zip(old, statuses, images)]
    uids = [make_uid(u or "", c or "") for u, c in zip(part.column("url").to_pylist(), part.column("caption").to_pylist())]
    replaced = {"status": pa.array(statuses, pa.string()), "error_message": pa.array(messages, pa.string())}
    extras = [c for c in part.column_names if c not in IMG2DATASET_COLUMNS + ("url", "caption", "sha256")]
    # an input column named like one dallekit writes is kept as source_<name>, as ingest keeps it
    renamed = {c: (f"source_{c}" if c in RESERVED else c) for c in extras}
    if len(set(renamed.values())) < len(renamed):
        clash = next(c for c in extras if renamed[c] != c and renamed[c] in extras)
        raise BadInputError(f"{task.path}: columns {clash} and {renamed[clash]} would both be kept as {renamed[clash]}; rename one")
    return pa.table({"uid": pa.array(uids, pa.string()), "url": part.column("url"), "caption": part.column("caption"),
                     **{renamed[c]: part.column(c) for c in extras},
                     **{c: replaced[c] if c in replaced else part.column(c) for c in IMG2DATASET_COLUMNS
                        if c in part.column_names or c in replaced},
                     "sha256": pa.array(sha, pa.string()), "jpg": jpg})


def repeated_keys(keys: list, layout: str) -> set:
    """The keys more than one row of a webdataset or files shard has: their images are found by key, so no row can be given one."""
    if layout == "parquet":  # the bytes are in the row itself
        return set()
    return {k for k, n in collections.Counter(keys).items() if n > 1}


def _url_rejects(table: pa.Table, first: int, duplicate_of: dict[int, str], base: int, repeated: set) -> tuple[pa.Table, pa.Table]:
    """(kept, rejected) rows of an adopted slice whose first row is the shard's row `first` (in key order)."""
    dup_col = pa.array([duplicate_of.get(base + first + i) for i in range(table.num_rows)], pa.string())
    # no URL: no row ingest would have made (and its uid, of an empty URL, could repeat another's)
    reasons = ["empty_url" if not u else "duplicate_key" if k in repeated else "duplicate_url" if d is not None else None
               for u, k, d in zip(table.column("url").to_pylist(), table.column("key").to_pylist(), dup_col.to_pylist())]
    reason_col = pa.array(reasons, pa.string())
    rejected = pc.is_valid(reason_col)
    kept = table.filter(pc.invert(rejected)) if reason_col.null_count < table.num_rows else table  # no copy of the images when none is rejected
    rejects = table.drop_columns(["jpg"]).append_column("reason", reason_col).append_column("duplicate_of", dup_col).filter(rejected)
    return kept, rejects


def _image_sources(task: AdoptShard, meta: pa.Table, positions: np.ndarray) -> tuple[BinaryColumns | None, StoredImages | None, np.ndarray]:
    """Where a shard's images and other binary columns come from, and each row's bytes (to cut slices)."""
    big = _big_columns(shard_schema(task.path)[0])
    columns = BinaryColumns(task.path, big) if big else None
    sizes = columns.row_bytes(positions) if columns else np.zeros(meta.num_rows)
    if task.layout == "parquet":
        return columns, None, sizes
    keys = meta.column("key").to_pylist()
    repeated = repeated_keys(keys, task.layout)  # rejected as duplicate_key: their images are not read
    wanted = {k for k, s in zip(keys, meta.column("status").to_pylist())
              if s == "success" and isinstance(k, str) and KEY.fullmatch(k) and k not in repeated}
    stored = (_index_tar if task.layout == "webdataset" else _index_files)(task, wanted, set(keys))
    return columns, stored, sizes + stored.row_bytes(keys)


def _adopted_slices(task: AdoptShard, meta: pa.Table, positions: np.ndarray, duplicate_of: dict[int, str], result: ShardResult):
    """The shard's kept rows a slice of at most SLICE_BYTES image bytes at a time; fills in the result's rejects and counters."""
    columns, stored, sizes = _image_sources(task, meta, positions)
    order = shard_schema(task.path)[0].names  # the input's column order
    repeated = repeated_keys(meta.column("key").to_pylist(), task.layout)
    image_column = next((c for c in IMAGE_COLUMNS if columns and c in columns.names), None) if stored is None else None
    rejects, statuses, errors = [], collections.Counter(), collections.Counter()
    for start, end in _cut(sizes, SLICE_BYTES):
        part = meta.slice(start, end - start)
        binary = columns.take(positions[start:end]) if columns else {}
        if stored is None:  # parquet: the bytes are in the rows, and stay in Arrow
            jpg = binary.pop(image_column)
            binary = {c: v for c, v in binary.items() if c not in IMAGE_COLUMNS}  # img2dataset's other encodings: not images of these rows
        else:
            jpg = pa.array(stored.read(part.column("key").to_pylist()), pa.binary())
        for name, values in binary.items():
            part = part.append_column(name, values)
        part = part.select([c for c in order if c in part.column_names])
        kept, rejected = _url_rejects(_adopt_slice(task, part, jpg, stored), start, duplicate_of, task.index << 32, repeated)
        rejects.append(rejected)
        counts = status_counters(kept)
        statuses.update(counts["status"])
        errors.update(counts["error_message"])
        yield kept
        pa.default_memory_pool().release_unused()
    result.rejects = pa.concat_tables(rejects)
    result.counters = {**result.counters, "status": dict(statuses), "error_message": top_counts(errors), "layout": {task.layout: 1}}
    if stored is not None:
        result.counters[UNMATCHED[task.layout]] = dict(stored.unmatched)


def adopt_shard(payload: tuple[AdoptShard, str]) -> ShardResult:
    """One img2dataset shard as download's layout, a slice at a time, its repeated URLs (found by the global pass) rejected."""
    task, scratch = payload
    meta, positions, repaired = _metadata(task.path)
    fs, root = _fs(f"{scratch}/block_dups/b-{task.index:06d}.parquet")
    with fs.open(root, "rb") as f:
        dups = pq.read_table(f)
    duplicate_of = dict(zip(dups.column("_order").to_pylist(), dups.column("duplicate_of").to_pylist()))
    result = ShardResult(rows_in=meta.num_rows, kept=[])
    result.kept = _adopted_slices(task, meta, positions, duplicate_of, result)
    result.counters["utf8_repaired"] = repaired
    return result


STAGE = Stage("adopt", (), frozenset(), "an img2dataset output folder", adopt_shard, rules=("empty_url", "duplicate_key", "duplicate_url"))


def plan_adopt(input_dir: str, config: AdoptConfig) -> Plan:
    """The img2dataset shards, their layout and columns checked; the URL dedup passes as the global pass."""
    paths = list_img2dataset_shards(input_dir)
    numbers = [shard_index(p) for p in paths]
    if len(set(numbers)) != len(numbers):  # 00001.parquet and 1.parquet would both become part-00001
        twice = sorted({n for n in numbers if numbers.count(n) > 1})[0]
        raise BadInputError(f"{input_dir}: two shards are numbered {twice} ({', '.join(p for p, n in zip(paths, numbers) if n == twice)})")
    layout = detect_layout(input_dir, paths, config.format)
    rows = check_metadata(paths, layout)
    n_buckets = max(1, math.ceil(sum(rows) / ROWS_PER_BUCKET))
    tasks = [AdoptShard(p, layout, i, config) for i, p in enumerate(paths)]
    fs, _ = _fs(input_dir)
    identity = {"path": os.path.realpath(input_dir) if "://" not in input_dir else input_dir, "layout": layout,
                "shards": [(p.rsplit("/", 1)[-1], shard_schema(p)[1], *_file_state(fs, p), *_companion_state(fs, p, layout)) for p in paths]}

    def global_pass(client, output_dir: str) -> int:  # the repeated URLs, as ingest finds them
        scratch = work_dir(output_dir)
        groups = _groups(tasks, rows)
        scanned = run_pass(client, scratch, "scan", scan_shards, {f"g-{g[0].index:06d}": g for g in groups}, desc="adopt scan",
                           unit="group", work_dir=scratch, n_buckets=n_buckets)
        return find_repeats(client, output_dir, list(scanned.values()), n_buckets, [[t.index for t in g] for g in groups], "adopt")

    return Plan(inputs=[input_dir], fingerprint={"input": identity, "options": output_options(config)},
                stats_config=asdict(config) | {"input": input_dir, "layout": layout}, global_pass=global_pass,
                tasks=lambda _, output_dir: [ShardTask(shard_name(shard_index(t.path)), (t, work_dir(output_dir))) for t in tasks])


def adopt(input_dir: str, output_dir: str, config: AdoptConfig, client, plan: Plan | None = None) -> dict:
    """Run the adopt stage over every shard of an img2dataset output folder."""
    stats = run_plan(STAGE, plan or plan_adopt(input_dir, config), output_dir, client, config.overwrite)
    for layout, counter in UNMATCHED.items():
        unmatched = stats.get("counters", {}).get(counter, {})
        if sum(unmatched.values()):  # one line for the stage, not one per member
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(unmatched.items()))
            where = "tar members" if layout == "webdataset" else "files in the image folders"
            print(f"adopt: {sum(unmatched.values())} {where} named no metadata row ({kinds}); left out, counted as {counter} in _stats.json")
    return stats
