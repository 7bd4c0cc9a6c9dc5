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
image that is missing, not a regular file or larger than `--max-image-bytes` turns its row into
`failed_to_download` with an `adopt: ...` message. Only a URL repeated across the folder is
rejected (`duplicate_url`, like ingest; a row with no URL is `empty_url`), found by ingest's bucketed passes, in
`_work/`, so no task holds more than a bucket of URLs. Images are never decoded here (clean
does that, reading each header first); tar members are read into memory only when they are
regular files of at most `--max-image-bytes`, and nothing is extracted to disk.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import tarfile
from dataclasses import asdict, dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.config import AdoptConfig, BadInputError, output_options
from dallekit.io import check_columns, read_shard, shard_schema, write_table_atomic
from dallekit.pipeline.download import status_counters
from dallekit.pipeline.ingest import RESERVED, dedup_bucket, make_uid, regroup_dups, url_buckets
from dallekit.pipeline.shards import ShardResult, ShardTask, map_with_progress, shard_name
from dallekit.pipeline.stage import Plan, Stage, run_plan, work_dir

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
        for name in ("url", "key", "status"):  # img2dataset always fills these
            if pa.types.is_null(schema.field(name).type):
                raise BadInputError(f"{path}: column {name} holds only nulls, expected strings (img2dataset's own column)")
        for name in ("caption", "key", "error_message", "sha256"):
            field = schema.field(name) if name in schema.names else None
            if field is not None and not (pa.types.is_string(field.type) or pa.types.is_null(field.type)):
                raise BadInputError(f"{path}: column {name} holds {field.type}, expected string (img2dataset's own column)")
        images = [c for c in IMAGE_COLUMNS if c in schema.names]
        if layout == "parquet" and not images:
            raise BadInputError(f"{path}: no image column ({', '.join(IMAGE_COLUMNS)}); expected img2dataset's parquet output, "
                                "or pass --format webdataset or files")
        if layout == "parquet" and not pa.types.is_binary(schema.field(images[0]).type) and not pa.types.is_large_binary(schema.field(images[0]).type):
            raise BadInputError(f"{path}: column {images[0]} holds {schema.field(images[0]).type}, expected binary image bytes")
        rows.append(n)
    return rows


TAKE_ROWS = 64  # image rows gathered per chunk while sorting: at 20 MiB an image, a chunk stays under Arrow's 2 GiB


def _metadata(path: str, columns: list[str] | None = None) -> pa.Table:
    """A shard's rows in key order (img2dataset writes them as downloads complete), url stripped as ingest does."""
    table = read_shard(path, columns=columns)
    order = pc.sort_indices(table, [("key", "ascending")])
    images = [c for c in IMAGE_COLUMNS if c in table.column_names]
    small = table.drop_columns(images).combine_chunks().take(order)  # one chunk: a chunked take is 10x slower
    for name in images:  # gathered in slices: one combined binary column of a big shard would pass 2 GiB
        column = table.column(name)
        small = small.append_column(name, pa.chunked_array([column.take(order[i : i + TAKE_ROWS]) for i in range(0, len(order), TAKE_ROWS)],
                                                           column.type))
    url = pc.utf8_trim_whitespace(small.column("url"))
    return small.set_column(small.column_names.index("url"), "url", url)


def scan_shards(group: list[AdoptShard], work_dir: str, n_buckets: int) -> int:
    """Prepare pass 1 for a group of shards (one Dask task: each shard's part is small); returns their rows."""
    return sum(scan_shard(task, work_dir, n_buckets) for task in group)


def regroup_shards(group: list[int], work_dir: str) -> int:
    """Prepare pass 3 for a group of shards: each shard's repeats from every bucket in one file; returns their count."""
    return sum(regroup_dups(index, work_dir) for index in group)


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


def scan_shard(task: AdoptShard, work_dir: str, n_buckets: int) -> int:
    """Prepare pass 1: bucket one shard's URLs (with uid and position) for the repeated-URL check; returns its rows."""
    table = _metadata(task.path, ["key", "url", "caption"])
    urls = table.column("url").to_pylist()
    valid = [i for i, u in enumerate(urls) if u]
    order = pa.array([(task.index << 32) + i for i in valid], pa.int64())
    part = pa.table({"url": pa.array([urls[i] for i in valid], pa.string()),
                     "uid": pa.array([make_uid(urls[i], c or "") for i, c in zip(valid, table.column("caption").take(valid).to_pylist())],
                                     pa.string()),
                     "_order": order})
    buckets = url_buckets(part.column("url"), n_buckets)
    for k in range(n_buckets):
        chunk = part.filter(pa.array(buckets == k))
        if chunk.num_rows:
            write_table_atomic(chunk, f"{work_dir}/urls/h-{k:04d}/b-{task.index:06d}.parquet")
    return table.num_rows


def _regular_files(fs, folder: str) -> dict[str, int]:
    """name -> size of the regular files in one image folder (links and anything else left out)."""
    if _is_local(fs):
        with os.scandir(folder) as entries:
            return {e.name: e.stat(follow_symlinks=False).st_size for e in entries if e.is_file(follow_symlinks=False)}
    return {p["name"].rsplit("/", 1)[-1]: p["size"] for p in fs.ls(folder, detail=True) if p.get("type") == "file"}


def _read_images(task: AdoptShard, keys: set[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """The images of a webdataset or files shard by key, and why a key's image could not be taken."""
    fs, _ = _fs(task.path)
    limit = task.config.max_image_bytes
    images, problems = {}, {}
    companion = _companion(task.path, task.layout)
    if task.layout == "files":
        _, folder = _fs(companion)
        sizes = _regular_files(fs, folder)
        for name, size in sorted(sizes.items()):
            found = MEMBER.fullmatch(name)
            if not found or found.group(1) not in keys or found.group(1) in images:
                continue
            if size > limit:
                problems[found.group(1)] = f"adopt: {name} is {size} bytes, more than --max-image-bytes {limit}"
                continue
            with fs.open(f"{folder}/{name}", "rb") as f:
                data = f.read(limit + 1)
            if len(data) > limit:  # it grew since it was listed
                problems[found.group(1)] = f"adopt: {name} is more than --max-image-bytes {limit} bytes"
            else:
                images[found.group(1)] = data
        return images, problems
    try:
        with fs.open(companion, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:  # streamed: members are never extracted, links and devices never followed
                found = MEMBER.fullmatch(member.name)
                if not found or found.group(1) not in keys or found.group(1) in images:
                    continue
                if not member.isreg():
                    problems[found.group(1)] = f"adopt: {member.name} in the tar is not a regular file"
                elif member.size > limit:
                    problems[found.group(1)] = f"adopt: {member.name} is {member.size} bytes, more than --max-image-bytes {limit}"
                else:
                    images[found.group(1)] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as err:  # a disk error is not the file's fault: it propagates
        raise BadInputError(f"{companion}: not a readable tar ({str(err) or type(err).__name__}); expected img2dataset's webdataset shard") from None
    return images, problems


def adopt_shard(payload: tuple[AdoptShard, str]) -> ShardResult:
    """One img2dataset shard as download's layout, its repeated URLs (found by the prepare pass) rejected."""
    task, scratch = payload
    table = _metadata(task.path)
    keys = table.column("key").to_pylist()
    statuses = table.column("status").to_pylist()
    messages = table.column("error_message").to_pylist() if "error_message" in table.column_names else [None] * len(keys)
    limit = task.config.max_image_bytes
    if task.layout == "parquet":  # the bytes are in the rows, and stay in Arrow (no per-image copies)
        column = next(c for c in IMAGE_COLUMNS if c in table.column_names)  # check_metadata made sure of one
        jpg = table.column(column).cast(pa.binary())
        table = table.drop_columns([c for c in IMAGE_COLUMNS if c in table.column_names])
        sizes = pc.binary_length(jpg).to_pylist()
        for i, (status, size) in enumerate(zip(statuses, sizes)):
            if status == "success" and size is None:
                statuses[i], messages[i] = "failed_to_download", f"adopt: no image bytes for key {str(keys[i])[:40]} in its {column} column"
            elif status == "success" and size > limit:
                statuses[i], messages[i] = "failed_to_download", f"adopt: image of key {str(keys[i])[:40]} is {size} bytes, more than --max-image-bytes {limit}"
        jpg = pc.if_else(pc.equal(pa.array(statuses, pa.string()), "success"), jpg, pa.scalar(None, pa.binary()))
    else:
        wanted = {k for k, s in zip(keys, statuses) if s == "success" and isinstance(k, str) and KEY.fullmatch(k)}
        images, problems = _read_images(task, wanted)
        where = os.path.basename(_companion(task.path, task.layout))
        for i, (key, status) in enumerate(zip(keys, statuses)):
            if status == "success" and key not in images:
                bad_key = not (isinstance(key, str) and KEY.fullmatch(key))
                statuses[i] = "failed_to_download"
                messages[i] = (f"adopt: key {str(key)[:40]!r} is not img2dataset's numeric key" if bad_key
                               else problems.get(key, f"adopt: no image for key {key} in {where}"))
        jpg = pa.array([images.get(k) if s == "success" else None for k, s in zip(keys, statuses)], pa.binary())
    old = table.column("sha256").to_pylist() if "sha256" in table.column_names else [None] * len(keys)
    # img2dataset's hash (of the downloaded bytes) is kept; only a missing one is computed, from the stored bytes
    todo = [i for i, (h, s) in enumerate(zip(old, statuses)) if h is None and s == "success"]
    for i, image in zip(todo, jpg.take(pa.array(todo, pa.int64())).to_pylist()):
        old[i] = hashlib.sha256(image).hexdigest()
    sha = [h if s == "success" else None for h, s in zip(old, statuses)]
    urls = table.column("url").to_pylist()
    uids = [make_uid(u or "", c or "") for u, c in zip(urls, table.column("caption").to_pylist())]
    replaced = {"status": pa.array(statuses, pa.string()), "error_message": pa.array(messages, pa.string())}
    extras = [c for c in table.column_names if c not in IMG2DATASET_COLUMNS + ("url", "caption", "sha256")]
    # an input column named like one dallekit writes is kept as source_<name>, as ingest keeps it
    renamed = {c: (f"source_{c}" if c in RESERVED else c) for c in extras}
    if len(set(renamed.values())) < len(renamed):
        clash = next(c for c in extras if renamed[c] != c and renamed[c] in extras)
        raise BadInputError(f"{task.path}: columns {clash} and {renamed[clash]} would both be kept as {renamed[clash]}; rename one")
    out = pa.table({"uid": pa.array(uids, pa.string()), "url": table.column("url"), "caption": table.column("caption"),
                    **{renamed[c]: table.column(c) for c in extras},
                    **{c: replaced[c] if c in replaced else table.column(c) for c in IMG2DATASET_COLUMNS
                       if c in table.column_names or c in replaced},
                    "sha256": pa.array(sha, pa.string()), "jpg": jpg})
    fs, root = _fs(f"{scratch}/block_dups/b-{task.index:06d}.parquet")
    with fs.open(root, "rb") as f:
        dups = pq.read_table(f)
    duplicate_of = dict(zip(dups.column("_order").to_pylist(), dups.column("duplicate_of").to_pylist()))
    base = task.index << 32
    dup_col = pa.array([duplicate_of.get(base + i) for i in range(out.num_rows)], pa.string())
    # no URL: no row ingest would have made (and its uid, of an empty URL, could repeat another's)
    reasons = ["empty_url" if not u else ("duplicate_url" if d is not None else None) for u, d in zip(urls, dup_col.to_pylist())]
    reason_col = pa.array(reasons, pa.string())
    rejected = pc.is_valid(reason_col)
    kept = out.filter(pc.invert(rejected)) if reason_col.null_count < out.num_rows else out  # no copy of the images when none is rejected
    rejects = out.drop_columns(["jpg"]).append_column("reason", reason_col).append_column("duplicate_of", dup_col).filter(rejected)
    return ShardResult(rows_in=out.num_rows, kept=kept, rejects=rejects, counters=status_counters(kept) | {"layout": {task.layout: 1}})


STAGE = Stage("adopt", (), frozenset(), "an img2dataset output folder", adopt_shard, rules=("empty_url", "duplicate_url"))


def plan_adopt(input_dir: str, config: AdoptConfig) -> Plan:
    """The img2dataset shards, their layout and columns checked; the URL dedup passes as the prepare pass."""
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
                "shards": [(p.rsplit("/", 1)[-1], shard_schema(p)[1], fs.size(p),
                            fs.size(_companion(p, layout)) if layout == "webdataset" else None) for p in paths]}

    def prepare(client, output_dir: str) -> int:  # the repeated URLs, as ingest finds them
        scratch = work_dir(output_dir)
        groups = _groups(tasks, rows)
        map_with_progress(client, scan_shards, groups, desc="adopt scan", unit="group", work_dir=scratch, n_buckets=n_buckets)
        repeats = map_with_progress(client, dedup_bucket, list(range(n_buckets)), desc="adopt dedup", unit="bucket", work_dir=scratch)
        map_with_progress(client, regroup_shards, [[t.index for t in g] for g in groups], desc="adopt regroup", unit="group", work_dir=scratch)
        return sum(repeats)

    return Plan(inputs=[input_dir], fingerprint={"input": identity, "options": output_options(config)},
                stats_config=asdict(config) | {"input": input_dir, "layout": layout}, prepare=prepare,
                tasks=lambda _, output_dir: [ShardTask(shard_name(shard_index(t.path)), (t, work_dir(output_dir))) for t in tasks])


def adopt(input_dir: str, output_dir: str, config: AdoptConfig, client, plan: Plan | None = None) -> dict:
    """Run the adopt stage over every shard of an img2dataset output folder."""
    return run_plan(STAGE, plan or plan_adopt(input_dir, config), output_dir, client, config.overwrite)
