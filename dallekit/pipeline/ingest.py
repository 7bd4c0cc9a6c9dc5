"""ingest: URL lists in any supported format -> URL shards with `uid, url, caption` and extra columns.

Inputs stream through Dask in resumable passes (`passes.run_pass`), so no process ever holds all rows:

1. scan: one task per input block (a byte range of a text file, a Parquet row group, a chunk of
   a folder's images) normalises it to `blocks/b-N.parquet` in the stage's scratch folder and
   writes the URLs of its valid rows, one file of a stream per hash bucket (`url_dedup`).
2. URL dedup (`url_dedup.find_repeats`): one task per bucket finds repeated URLs (the first in
   input order is kept), one task per block gathers its repeats from every bucket into one file.
3. shards: the stage runner writes output shard i from input rows [i*S, (i+1)*S), so a rerun
   produces the same shards; rejected rows go to `_rejects/` with a reason.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import posixpath
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dallekit.config import IngestConfig, output_options
from dallekit.errors import BadInputError
from dallekit.io import write_json_atomic, write_table_atomic
from dallekit.pipeline.passes import run_pass, work_dir
from dallekit.pipeline.shards import ShardResult, ShardTask, shard_name
from dallekit.pipeline.stage import Plan, Stage, run_plan
from dallekit.pipeline.url_dedup import find_repeats, orders, read_block_dups, write_url_parts

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TEXT_FORMATS = ("cc3m", "csv", "tsv", "jsonl")
# Columns later stages add; an input column with one of these names is kept as `source_<name>`.
RESERVED = {
    "uid", "url", "caption", "reason", "duplicate_of", "key", "status", "error_message", "width", "height",
    "original_width", "original_height", "exif", "sha256", "jpg", "png", "webp", "txt", "retries",
}
BUCKET_BYTES = 256 * 2**20  # input bytes per URL dedup bucket: bounds a bucket task's memory; 4M rows use two workers
FOLDER_CHUNK = 10000  # images of a folder per scan task
PARQUET_BLOCK_ROWS = 1_000_000  # rows of a Parquet row group per scan task; a bigger group is read in slices
PARQUET_BATCH_ROWS = 65_536  # rows decoded at a time while a task seeks to its slice
OUTSIDE_FOLDER = "outside_input_folder"  # reject reason: an image or caption resolves outside its input folder
FILE_ROOTS = "_file_roots.json"  # the local folders an ingest read; download reads file:// URLs only inside them


@dataclass
class InputFile:
    """One input file (or image folder) with its resolved format and column names."""

    path: str  # fsspec URL or local path
    format: str
    url_col: str
    caption_col: str
    size: int
    root: str | None = None  # a local image folder's resolved path: every file read must lie inside it


@dataclass
class Block:
    """One scan task's share of an input: a byte range, a row group or slices of folders' image lists."""

    index: int
    file: InputFile
    offset: int = 0
    length: int = 0
    row_group: int = -1
    rows: tuple[int, int] | None = None  # a slice [start, stop) of a Parquet row group too big for one task
    # (folder, start, stop, images in the folder): the task lists the folder again and takes [start:stop],
    # so the driver holds counts per folder, never the file names of the whole tree
    folders: list[tuple[str, int, int, int]] | None = None

    @property
    def images(self) -> int:
        """The number of images this block reads from folders."""
        return sum(stop - start for _, start, stop, _ in self.folders or [])


# ---------------------------------------------------------------- resolving inputs


def _fs(path: str):
    return fsspec.core.url_to_fs(path)


def _unstrip(fs, path: str, original: str) -> str:
    return fs.unstrip_protocol(path) if "://" in original else path


def _is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def _walk_images(fs, top: str):
    """(folder, its image file names sorted) for each folder under `top` in sorted order, one folder at a time.

    A local walk does not enter symlinked folders: a link could pull a whole tree from elsewhere into the input.
    """
    walker = os.walk(top) if _is_local(fs) else fs.walk(top)
    for folder, dirs, names in walker:
        dirs.sort()  # both walks honour an in-place sort: a stable order of folders
        images = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
        if images:
            yield folder, images


def _folder_images(fs, folder: str) -> list[str]:
    """The image file names directly in one folder, sorted, as `_walk_images` lists them."""
    if _is_local(fs):
        names = [e.name for e in os.scandir(folder) if not e.is_dir()]
    else:
        names = [posixpath.basename(e["name"]) for e in fs.ls(folder, detail=True) if e["type"] != "directory"]
    return sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS))


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def expand_inputs(inputs: list[str], config: IngestConfig) -> list[InputFile]:
    """Resolve globs and folders into typed input files; bad input names the path and the problem."""
    files: list[InputFile] = []
    for raw in inputs:
        fs, path = _fs(raw)
        if any(ch in path for ch in "*?["):
            matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not matches:
                raise BadInputError(f"{raw}: no file matches this pattern")
            files += [_resolve_file(fs, _unstrip(fs, p, raw), p, config) for p in matches]
        elif fs.isdir(path):
            if config.format == "folder" or (config.format == "auto" and _looks_like_image_folder(fs, path)):
                root = os.path.realpath(path) if _is_local(fs) else None
                files.append(InputFile(raw, "folder", "url", "caption", 0, root=root))
                continue
            matches = sorted(p for p in fs.find(path) if not posixpath.basename(p).startswith((".", "_")))
            if not matches:
                raise BadInputError(f"{raw}: folder is empty")
            files += [_resolve_file(fs, _unstrip(fs, p, raw), p, config) for p in matches]
        elif fs.isfile(path):
            files.append(_resolve_file(fs, raw, path, config))
        else:
            raise BadInputError(f"{raw}: no such file or folder")
    return files


def _looks_like_image_folder(fs, path: str) -> bool:
    return next(_walk_images(fs, path), None) is not None


def _detect_format(fs, path: str, raw: str, config: IngestConfig) -> str:
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith(".parquet"):
        names = _parquet_schema(fs, path, raw).names
        return "laion" if config.url_col is None and "URL" in names and "TEXT" in names else "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".tsv"):
        first = _first_line(fs, path, raw)
        url_col = config.url_col or "url"
        return "tsv" if url_col in first.split("\t") else "cc3m"
    raise BadInputError(
        f"{raw}: unknown format (extension not .csv/.tsv/.jsonl/.parquet); pass --format cc3m|laion|csv|tsv|jsonl|parquet"
    )


def _first_line(fs, path: str, raw: str) -> str:
    with fs.open(path, "rb", compression="infer") as f:
        head = f.read(65536)
    try:
        return head.decode("utf-8").split("\n", 1)[0].rstrip("\r")
    except UnicodeDecodeError:
        raise BadInputError(f"{raw}: not UTF-8 text (is it binary?)") from None


def _parquet_schema(fs, path: str, raw: str) -> pa.Schema:
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).schema_arrow
    except (pa.ArrowInvalid, OSError) as err:
        raise BadInputError(f"{raw}: not a readable Parquet file ({err})") from None


def _resolve_file(fs, raw: str, path: str, config: IngestConfig) -> InputFile:
    size = fs.size(path)
    if size == 0:
        raise BadInputError(f"{raw}: file is empty")
    fmt = config.format if config.format not in ("auto", "folder") else _detect_format(fs, path, raw, config)
    if config.format == "folder":
        raise BadInputError(f"{raw}: --format folder needs a folder of images with .txt captions")
    default_url, default_caption = ("URL", "TEXT") if fmt == "laion" else ("url", "caption")
    file = InputFile(raw, fmt, config.url_col or default_url, config.caption_col or default_caption, size)
    _check_columns(fs, path, file)
    return file


def _check_columns(fs, path: str, file: InputFile) -> None:
    """Read the file's header (or schema) and check the URL and caption columns are there."""
    if file.format == "cc3m":
        if len(_first_line(fs, path, file.path).split("\t")) < 2:
            raise BadInputError(f"{file.path}: expected Conceptual Captions TSV rows 'caption<TAB>url'")
        return
    if file.format in ("parquet", "laion"):
        names = _parquet_schema(fs, path, file.path).names
    else:
        with fs.open(path, "rb", compression="infer") as f:
            head = f.read(1 << 20)
        head = head[: head.rfind(b"\n") + 1] or head
        names = list(_parse_text(head, file, header=None, nrows=50).columns)
    for role, col in (("URL", file.url_col), ("caption", file.caption_col)):
        if col not in names:
            option = "--url-col" if role == "URL" else "--caption-col"
            raise BadInputError(
                f"{file.path}: no {role} column '{col}' (columns: {', '.join(map(str, names[:20]))}); pass {option}"
            )


def _parse_text(data: bytes, file: InputFile, header: bytes | None, nrows: int | None = None) -> pd.DataFrame:
    """Parse a block of CSV/TSV/CC3M/JSONL bytes; a parse error is bad input naming the file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(f"{file.path}: not UTF-8 text near byte {err.start} (is it binary?)") from None
    if "\x00" in text:
        raise BadInputError(f"{file.path}: contains NUL bytes (is it binary?)")
    try:
        if file.format == "jsonl":
            lines = [line for line in text.splitlines()[:nrows] if line.strip()]
            return pd.DataFrame.from_records([_json_object(line, file) for line in lines])
        if header is not None:
            text = header.decode("utf-8") + text
        if file.format == "cc3m":
            return pd.read_csv(
                io.StringIO(text), sep="\t", header=None, names=["caption", "url"], usecols=[0, 1],
                dtype=str, na_filter=False, quoting=3, nrows=nrows,
            )
        sep = "," if file.format == "csv" else "\t"
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, na_filter=False, nrows=nrows)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise BadInputError(f"{file.path}: cannot parse as {file.format} ({str(err).splitlines()[0]})") from None


def _json_object(line: str, file: InputFile) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadInputError(f"{file.path}: invalid JSON line ({err})") from None
    if not isinstance(obj, dict):
        raise BadInputError(f"{file.path}: each JSONL line must be an object, got {type(obj).__name__}")
    return obj


def plan_blocks(files: list[InputFile], config: IngestConfig) -> list[Block]:
    """Split the inputs into scan tasks, in input order."""
    blocks: list[Block] = []
    for file in files:
        fs, path = _fs(file.path)
        if file.format == "folder":
            before = len(blocks)
            blocks += _folder_blocks(fs, file, before)
            if len(blocks) == before:
                raise BadInputError(f"{file.path}: no images (.jpg, .png, ...) in this folder")
        elif file.format in ("parquet", "laion"):
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            for group in range(meta.num_row_groups):
                n = meta.row_group(group).num_rows
                for start in range(0, max(n, 1), PARQUET_BLOCK_ROWS):  # files written as one huge row group too
                    rows = (start, min(n, start + PARQUET_BLOCK_ROWS)) if n > PARQUET_BLOCK_ROWS else None
                    blocks.append(Block(len(blocks), file, row_group=group, rows=rows))
        elif fsspec.utils.infer_compression(path):  # compressed text cannot be split by bytes
            blocks.append(Block(len(blocks), file, offset=0, length=-1))
        else:
            for offset in range(0, file.size, config.block_bytes):
                blocks.append(Block(len(blocks), file, offset=offset, length=config.block_bytes))
    return blocks


# ---------------------------------------------------------------- pass 1: scan


def _folder_blocks(fs, file: InputFile, first_index: int) -> list[Block]:
    """Blocks of up to FOLDER_CHUNK images over a folder tree, from one folder's listing at a time."""
    blocks, segments, filled = [], [], 0
    for folder, images in _walk_images(fs, file.root or _fs(file.path)[1]):
        start = 0
        while start < len(images):
            take = min(len(images) - start, FOLDER_CHUNK - filled)
            segments.append((folder, start, start + take, len(images)))
            filled, start = filled + take, start + take
            if filled == FOLDER_CHUNK:
                blocks.append(Block(first_index + len(blocks), file, folders=segments))
                segments, filled = [], 0
    if segments:
        blocks.append(Block(first_index + len(blocks), file, folders=segments))
    return blocks


def _block_images(fs, block: Block) -> list[str]:
    """The paths of a folder block's images, listed again; a folder that changed since planning is bad input."""
    paths = []
    for folder, start, stop, count in block.folders or []:
        names = _folder_images(fs, folder)
        if len(names) != count:
            raise BadInputError(f"{folder}: had {count} images when ingest started and {len(names)} now; "
                                "expected the input folder not to change while ingesting")
        paths += [posixpath.join(folder, n) if not _is_local(fs) else os.path.join(folder, n) for n in names[start:stop]]
    return paths


def make_uid(url: str, caption: str) -> str:
    """The stable sample id: a 64-bit BLAKE2b of url and caption, as 16 hex digits."""
    return hashlib.blake2b(f"{url}\x00{caption}".encode(), digest_size=8).hexdigest()


def _read_block(block: Block) -> pd.DataFrame:
    """The block's rows as a DataFrame with `url` and `caption` plus the input's other columns."""
    file = block.file
    fs, path = _fs(file.path)
    if file.format == "folder":
        images = _block_images(fs, block)
        rows = [_local_image_row(fs, file.root, image) if file.root else _remote_image_row(fs, image) for image in images]
        return pd.DataFrame(rows, columns=["url", "caption", "_reason"])
    if file.format in ("parquet", "laion"):
        with fs.open(path, "rb") as f:
            table = _read_row_group(pq.ParquetFile(f), block)
        df = table.to_pandas()
    else:
        with fs.open(path, "rb", compression="infer") as f:
            if block.length < 0:
                data = f.read()
            else:
                data = fsspec.utils.read_block(f, block.offset, block.length, delimiter=b"\n")
        header = None
        if block.offset > 0 and file.format in ("csv", "tsv"):
            header = _first_line(fs, path, file.path).encode() + b"\n"
        if not data.strip():
            return pd.DataFrame({"url": pd.Series([], dtype=object), "caption": pd.Series([], dtype=object)})
        df = _parse_text(data, file, header)
        if file.format == "jsonl":
            df = _normalise_json_columns(df, file)
    df = df.rename(columns={c: f"source_{c}" for c in df.columns if c in RESERVED and c not in (file.url_col, file.caption_col)})
    return df.rename(columns={file.url_col: "url", file.caption_col: "caption"})


def _read_row_group(pf: pq.ParquetFile, block: Block) -> pa.Table:
    """A block's row group, or its slice of one: batches before the slice are decoded and dropped, so memory stays one slice."""
    if block.rows is None:
        return pf.read_row_group(block.row_group)
    start, stop = block.rows
    parts, seen = [], 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[block.row_group]):
        lo, hi = max(start - seen, 0), min(stop - seen, batch.num_rows)
        if lo < hi:
            parts.append(batch.slice(lo, hi - lo))
        seen += batch.num_rows
        if seen >= stop:
            break
    return pa.Table.from_batches(parts, schema=pf.schema_arrow)


def _read_caption(fs, path: str) -> str:
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace").strip()


def _local_image_row(fs, root: str, image: str) -> dict:
    """A local image's row: its resolved file:// URL and caption, or a reject when either resolves outside `root`."""
    real = os.path.realpath(image)
    if not _inside(real, root):  # a symlink out of the folder: neither the image nor its caption is read
        return {"url": Path(image).as_uri(), "caption": None, "_reason": OUTSIDE_FOLDER}
    caption, reason = None, None
    text = image.rsplit(".", 1)[0] + ".txt"  # named after the listed image, not its link target
    if os.path.lexists(text):
        real_text = os.path.realpath(text)
        if not _inside(real_text, root):
            reason = OUTSIDE_FOLDER
        elif os.path.isfile(real_text):
            caption = _read_caption(fs, real_text)
    # as_uri percent-encodes the path: a name like `..%2Fx.jpg` must not be unquoted into `../x.jpg` by the reader
    return {"url": Path(real).as_uri(), "caption": caption, "_reason": reason}


def _remote_image_row(fs, image: str) -> dict:
    """An image of a non-local fsspec folder (memory://, s3://): its URL and .txt caption."""
    text = image.rsplit(".", 1)[0] + ".txt"
    caption = _read_caption(fs, text) if fs.exists(text) else None
    return {"url": fs.unstrip_protocol(image), "caption": caption, "_reason": None}


def _normalise_json_columns(df: pd.DataFrame, file: InputFile) -> pd.DataFrame:
    """JSON values vary by row; give every extra column one Arrow type: float64 if numeric, else string."""
    for col in df.columns:
        if col in (file.url_col, file.caption_col):
            continue
        values = df[col]
        numeric = values.map(lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))).all()
        if numeric:
            df[col] = pd.to_numeric(values, errors="coerce").astype("float64")
        else:
            df[col] = values.map(lambda v: v if v is None or isinstance(v, str) else json.dumps(v))
    return df


def _as_text(values: pd.Series) -> pd.Series:
    """Strings stay, missing values become None, anything else becomes its str()."""
    return values.map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))


def scan_block(block: Block, work_dir: str, n_buckets: int, allow_file_urls: bool) -> dict:
    """Pass 1: normalise one block, flag invalid rows, bucket its URLs; returns its row count and the URL parts' index."""
    df = _read_block(block)
    folder_reason = df.pop("_reason") if block.file.format == "folder" else None
    url = _as_text(df["url"]).map(lambda u: u.strip() if u is not None else None)
    caption = _as_text(df["caption"])
    reason = pd.Series([None] * len(df), dtype=object, index=df.index)
    lower = url.map(lambda u: (u or "").lower())
    allow_file = allow_file_urls or block.file.format == "folder"
    is_file = lower.str.startswith("file://")
    is_http = lower.str.startswith("http://") | lower.str.startswith("https://")
    empty_caption = caption.map(lambda c: c is None or not c.strip())
    # the first rule that fails names the reason
    reason[empty_caption] = "empty_caption"
    reason[is_file & ~allow_file] = "file_url_not_allowed"
    reason[~is_http & ~is_file] = "invalid_url_scheme"
    reason[url.map(lambda u: not u)] = "empty_url"
    if folder_reason is not None:  # a path outside the folder outranks every other reason
        reason = reason.where(folder_reason.isna(), folder_reason)
    extras = [c for c in df.columns if c not in ("url", "caption")]
    out = pd.DataFrame(
        {
            "uid": [make_uid(u or "", c or "") for u, c in zip(url, caption)],
            "url": url,
            "caption": caption,
            **{c: df[c] for c in extras},
            "_reason": reason,
            "_order": orders(block.index, len(df)),
        }
    )
    table = pa.Table.from_pandas(out, preserve_index=False)
    write_table_atomic(table, f"{work_dir}/blocks/b-{block.index:06d}.parquet", row_group_size=ROW_GROUP)
    parts = write_url_parts(table, n_buckets, work_dir, f"b-{block.index:06d}", keep=pc.is_null(table.column("_reason")))
    return {"rows": len(df), "parts": {"urls": parts}}


ROW_GROUP = 10000  # rows per row group of a block file; a shard task reads only the groups it needs


# ---------------------------------------------------------------- pass 3: output shards


@dataclass
class ShardPlan:
    """The input rows of one output shard: (block, first row, end row) slices, in order."""

    slices: list[tuple[int, int, int]]
    work_dir: str


def plan_shards(block_rows: list[int], shard_size: int, work_dir: str) -> list[ShardTask]:
    """Cut the concatenated blocks into shards of `shard_size` input rows."""
    tasks, slices, filled = [], [], 0
    for b, rows in enumerate(block_rows):
        start = 0
        while start < rows:
            take = min(rows - start, shard_size - filled)
            slices.append((b, start, start + take))
            filled += take
            start += take
            if filled == shard_size:
                tasks.append(ShardTask(shard_name(len(tasks)), ShardPlan(slices, work_dir)))
                slices, filled = [], 0
    if slices:
        tasks.append(ShardTask(shard_name(len(tasks)), ShardPlan(slices, work_dir)))
    return tasks


def _read_slice(work_dir: str, block: int, start: int, stop: int) -> pa.Table:
    fs, path = _fs(f"{work_dir}/blocks/b-{block:06d}.parquet")
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        first, last = start // ROW_GROUP, (stop - 1) // ROW_GROUP
        table = pf.read_row_groups(list(range(first, last + 1)))
    return table.slice(start - first * ROW_GROUP, stop - start)


def write_shard(plan: ShardPlan) -> ShardResult:
    """Pass 3: assemble one shard from its block slices and split kept rows from rejects."""
    parts = [_read_slice(plan.work_dir, b, start, stop) for b, start, stop in plan.slices]
    table = pa.concat_tables(parts, promote_options="permissive")
    dups = pa.concat_tables([read_block_dups(plan.work_dir, b, start, stop) for b, start, stop in plan.slices])
    dup_col = dups.column("duplicate_of").take(pc.index_in(table.column("_order"), value_set=dups.column("_order")))
    reasons = pc.if_else(pc.is_valid(dup_col), "duplicate_url", table.column("_reason").cast(pa.string()))
    rejected = pc.is_valid(reasons)
    data = table.drop_columns(["_reason", "_order"])
    kept = data.filter(pc.invert(rejected))
    rejects = data.append_column("reason", reasons).append_column("duplicate_of", dup_col).filter(rejected)
    return ShardResult(rows_in=table.num_rows, kept=kept, rejects=rejects)


# ---------------------------------------------------------------- the stage


def ingest_blocks(inputs: list[str], config: IngestConfig) -> list[Block]:
    """Check every input (format, columns) and split it into scan blocks; runs in the driver."""
    if config.shard_size < 1:
        raise BadInputError(f"--shard-size {config.shard_size}: expected a positive number of rows")
    if config.block_bytes < 1:
        raise BadInputError(f"--block-bytes {config.block_bytes}: expected a positive number of bytes")
    return plan_blocks(expand_inputs(inputs, config), config)


def write_file_roots(output_dir: str, blocks: list[Block]) -> list[str]:
    """Write `_file_roots.json` with the resolved local folders the blocks read; download allows file:// URLs only inside them."""
    roots = sorted({b.file.root for b in blocks if b.file.root})
    fs, root = _fs(output_dir)
    fs.makedirs(root, exist_ok=True)
    write_json_atomic({"roots": roots}, f"{output_dir.rstrip('/')}/{FILE_ROOTS}")
    return roots


WHOLE_HASH_BYTES = 64 * 2**20  # inputs up to this size are hashed whole; larger ones by their first and last MiB


def _content_id(path: str) -> str | None:
    """What identifies an input file's content: a sha256 for a local file, an object store's ETag or mtime else.

    Rewriting a file with the same rows (as the demo does on a rerun) is the same input; editing it is not.
    """
    fs, p = _fs(path)
    try:
        info = fs.info(p)
        if info.get("type") != "file":
            return None
        if "://" in path:
            value = info.get("ETag") or info.get("LastModified") or info.get("mtime")
            return str(value) if value is not None else None
        digest = hashlib.sha256()
        with fs.open(p, "rb") as f:
            if info["size"] <= WHOLE_HASH_BYTES:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            else:
                digest.update(f.read(1 << 20))
                f.seek(info["size"] - (1 << 20))
                digest.update(f.read(1 << 20))
        return digest.hexdigest()[:16]
    except OSError:
        return None


STAGE = Stage("ingest", (), frozenset(), "URL lists", write_shard)


def plan_ingest(inputs: list[str], config: IngestConfig) -> Plan:
    """The inputs checked and cut into scan blocks, and their identity; the scan, URL dedup and regroup passes as the global pass."""
    blocks = ingest_blocks(inputs, config)
    files = list({id(b.file): b.file for b in blocks}.values())
    images = collections.Counter()
    for b in blocks:  # one pass: inputs x blocks would be quadratic with many input files
        images[id(b.file)] += b.images
    identity = [{"path": f.path, "format": f.format, "size": f.size, "content": _content_id(f.path),
                 "images": images[id(f)]} for f in files]
    total_bytes = sum(f.size for f in files) + sum(b.images * 200 for b in blocks)
    n_buckets = max(1, math.ceil(total_bytes / BUCKET_BYTES))  # no cap: a bucket's rows, not their number, is bounded

    def global_pass(client, output_dir: str) -> list[int]:  # passes 1 and 2: rows per block
        scratch = work_dir(output_dir)
        scanned = run_pass(client, scratch, "scan", scan_block, {f"b-{b.index:06d}": b for b in blocks}, desc="ingest scan",
                           unit="block", work_dir=scratch, n_buckets=n_buckets, allow_file_urls=config.allow_file_urls)
        find_repeats(client, output_dir, list(scanned.values()), n_buckets, [[b.index] for b in blocks], "ingest")
        write_file_roots(output_dir, blocks)
        return [r["rows"] for r in scanned.values()]

    return Plan(inputs=list(inputs), fingerprint={"inputs": identity, "options": output_options(config)},
                stats_config=asdict(config) | {"inputs": inputs}, global_pass=global_pass,
                tasks=lambda block_rows, output_dir: plan_shards(block_rows, config.shard_size, work_dir(output_dir)))


def ingest(inputs: list[str], output_dir: str, config: IngestConfig, client, plan: Plan | None = None) -> dict:
    """Run the ingest stage: read every input, write URL shards, rejects and _stats.json."""
    return run_plan(STAGE, plan or plan_ingest(inputs, config), output_dir, client, config.overwrite)
