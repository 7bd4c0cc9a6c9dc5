"""clean: downloaded shards -> repaired captions, global exact and near-duplicate removal.

Three passes, like ingest:

1. scan: one task per shard drops failed downloads and undecodable images, repairs captions
   and computes the perceptual hash; it writes only small columns to `_work/scan/`.
2. dedup: one task reads the hashes of the whole dataset (never the images), walks it in uid
   order and marks exact duplicates (same sha256) and near duplicates (pHash within
   `--near-dup-distance` bits of a kept image), writing the marks per shard to `_work/dups/`.
3. shards: the stage runner joins each shard with its scan and dedup results.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import asdict

import ftfy
import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.config import BadInputError, CleanConfig
from dallekit.images import UndecodableImage, phash
from dallekit.pipeline.funnel import write_funnel
from dallekit.pipeline.shards import (
    ShardResult,
    ShardTask,
    list_shards,
    map_with_progress,
    read_shard,
    read_stats,
    run_stage,
    shard_schema,
    stage_complete,
    write_table_atomic,
)

# Reasons in the order the rules run; the funnel follows this order.
RULES = [
    "failed_to_download", "failed_to_resize", "undecodable", "empty_caption", "caption_too_long",
    "boilerplate_caption", "duplicate_image", "near_duplicate_image",
]
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TAG = re.compile(r"<[^<>]{0,200}>")
_SPACE = re.compile(r"\s+")
_BOILERPLATE = [
    re.compile(r"^\S+\.(jpe?g|png|gif|webp|bmp|tiff?|heic|raw)$", re.I),  # a file name
    re.compile(r"^(img|dsc|dscn|dcim|pxl|photo|image|screenshot)[\s_-]?\d+\b", re.I),  # a camera's name
    re.compile(r"^(https?://|www\.)\S+$", re.I),  # a bare URL
    re.compile(r"\bphotographed on\b", re.I),
    re.compile(r"^image may contain\b", re.I),
]


def repair_caption(value: object, lowercase: bool = False) -> str:
    """CLIP's basic_clean and more: ftfy, HTML unescape twice, no tags or control characters, one space."""
    if not isinstance(value, str):
        return ""
    text = _CONTROL.sub(" ", value)
    if not text.isascii():  # ftfy's repairs (mojibake, quotes, widths, NFC) only touch non-ASCII text
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = _SPACE.sub(" ", _TAG.sub(" ", text)).strip()
    return text.lower() if lowercase else text


def caption_reason(caption: str, config: CleanConfig) -> str | None:
    """The first caption rule a repaired caption fails, or None."""
    if not caption:
        return "empty_caption"
    if len(caption) > config.max_caption_chars:
        return "caption_too_long"
    if any(p.search(caption) for p in _BOILERPLATE):
        return "boilerplate_caption"
    return None


def scan_shard(path: str, work_dir: str, config: CleanConfig) -> int:
    """Pass 1: per-row reason (download, decode, caption), repaired caption and hashes; returns rows."""
    table = read_shard(path, columns=["uid", "caption", "status", "sha256", "jpg"])
    reasons, captions, hashes = [], [], []
    for status, caption, image in zip(
        table.column("status").to_pylist(), table.column("caption").to_pylist(), table.column("jpg").to_pylist()
    ):
        reason, fixed, hashed = None, repair_caption(caption, config.lowercase), None
        if status != "success":
            reason = status if status in RULES else "failed_to_download"
        else:
            try:
                hashed = phash(image)
            except UndecodableImage:
                reason = "undecodable"
        reason = reason or caption_reason(fixed, config)
        reasons.append(reason)
        captions.append(fixed)
        hashes.append(hashed)
    scan = pa.table(
        {
            "uid": table.column("uid"),
            "reason": pa.array(reasons, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "sha256": table.column("sha256"),
            "phash": pa.array(hashes, pa.uint64()),
        }
    )
    write_table_atomic(scan, f"{work_dir}/scan/{_stem(path)}.parquet")
    return table.num_rows


def _stem(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")


class NearDuplicateIndex:
    """Kept 64-bit hashes, found again within `distance` bits by multi-index hashing.

    Two hashes within d bits agree exactly on at least one of d+1 disjoint bit bands
    (pigeonhole), so only hashes sharing a band value are compared.
    """

    def __init__(self, distance: int):
        self.distance = distance
        n_bands = distance + 1
        edges = [round(i * 64 / n_bands) for i in range(n_bands + 1)]
        self.bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self.tables: list[dict[int, list[tuple[int, str]]]] = [{} for _ in self.bands]

    def find(self, value: int) -> tuple[str, int] | None:
        """(uid, distance) of a kept hash within the distance, or None."""
        for (shift, mask), table in zip(self.bands, self.tables):
            for kept, uid in table.get((value >> shift) & mask, ()):
                d = (value ^ kept).bit_count()
                if d <= self.distance:
                    return uid, d
        return None

    def add(self, value: int, uid: str) -> None:
        """Remember a kept hash."""
        for (shift, mask), table in zip(self.bands, self.tables):
            table.setdefault((value >> shift) & mask, []).append((value, uid))


def dedup_dataset(shard_names: list[str], work_dir: str, distance: int) -> dict:
    """Pass 2: walk every surviving row in uid order; mark exact then near duplicates per shard."""
    fs, root = fsspec.core.url_to_fs(work_dir)
    parts = []
    for name in shard_names:
        with fs.open(f"{root}/scan/{name}.parquet", "rb") as f:
            scan = pq.read_table(f, columns=["uid", "reason", "sha256", "phash"])
        scan = scan.filter(pc.is_null(scan.column("reason"))).drop_columns(["reason"])
        parts.append(scan.append_column("shard", pa.array([name] * scan.num_rows, pa.string())))
    rows = pa.concat_tables(parts).sort_by("uid")
    first_by_sha: dict[str, str] = {}
    index = NearDuplicateIndex(distance) if distance >= 0 else None
    marks: dict[str, list] = {name: [] for name in shard_names}
    for uid, sha, hashed, shard in zip(*(rows.column(c).to_pylist() for c in ("uid", "sha256", "phash", "shard"))):
        if sha is not None and sha in first_by_sha:
            marks[shard].append((uid, "duplicate_image", first_by_sha[sha], 0))
            continue
        if sha is not None:
            first_by_sha[sha] = uid
        near = index.find(hashed) if index is not None else None
        if near is not None:
            marks[shard].append((uid, "near_duplicate_image", near[0], near[1]))
        elif index is not None:
            index.add(hashed, uid)
    for name, found in marks.items():
        uids, reasons, of, dist = zip(*found) if found else ([], [], [], [])
        table = pa.table(
            {"uid": pa.array(uids, pa.string()), "reason": pa.array(reasons, pa.string()),
             "duplicate_of": pa.array(of, pa.string()), "duplicate_distance": pa.array(dist, pa.int32())}
        )
        write_table_atomic(table, f"{work_dir}/dups/{name}.parquet")
    return {name: len(found) for name, found in marks.items()}


def write_clean_shard(payload: tuple[str, str]) -> ShardResult:
    """Pass 3: one shard joined with its scan and dedup marks; kept rows get the repaired caption."""
    path, work_dir = payload
    name = _stem(path)
    table = read_shard(path)
    fs, root = fsspec.core.url_to_fs(work_dir)
    with fs.open(f"{root}/scan/{name}.parquet", "rb") as f:
        scan = pq.read_table(f)
    with fs.open(f"{root}/dups/{name}.parquet", "rb") as f:
        dups = pq.read_table(f)
    dup_by_uid = {u: (r, o, d) for u, r, o, d in zip(*(dups.column(c).to_pylist() for c in dups.column_names))}
    reasons, dup_of, dup_dist = [], [], []
    for uid, reason in zip(scan.column("uid").to_pylist(), scan.column("reason").to_pylist()):
        mark = dup_by_uid.get(uid)
        reasons.append(mark[0] if mark else reason)
        dup_of.append(mark[1] if mark else None)
        dup_dist.append(mark[2] if mark else None)
    caption_index = table.column_names.index("caption")
    raw = table.column("caption")
    table = table.set_column(caption_index, "caption", scan.column("caption"))
    table = table.add_column(caption_index + 1, "caption_raw", raw)
    table = table.append_column("phash", scan.column("phash"))
    reason_col = pa.array(reasons, pa.string())
    rejected = pc.is_valid(reason_col)
    kept = table.filter(pc.invert(rejected))
    rejects = (
        table.append_column("reason", reason_col)
        .append_column("duplicate_of", pa.array(dup_of, pa.string()))
        .append_column("duplicate_distance", pa.array(dup_dist, pa.int32()))
        .filter(rejected)
    )
    return ShardResult(rows_in=table.num_rows, kept=kept, rejects=rejects)


def plan_clean(input_dir: str) -> list[str]:
    """The downloaded shards to clean; checks they have the columns download writes."""
    paths = list_shards(input_dir)
    for path in paths:
        missing = {"uid", "caption", "status", "sha256", "jpg"} - set(shard_schema(path)[0].names)
        if missing:
            raise BadInputError(f"{path}: missing column(s) {', '.join(sorted(missing))} (expected shards from `dallekit download`)")
    return paths


def clean(input_dir: str, output_dir: str, config: CleanConfig, client, paths: list[str] | None = None) -> dict:
    """Run the clean stage over every downloaded shard of `input_dir`."""
    if stage_complete(output_dir):
        print(f"clean: {output_dir} is already complete (remove it to run again)")
        return read_stats(output_dir)
    started = time.time()
    paths = paths if paths is not None else plan_clean(input_dir)
    work_dir = output_dir.rstrip("/") + "/_work"
    fs, work_root = fsspec.core.url_to_fs(work_dir)
    names = [_stem(p) for p in paths]
    if not fs.exists(f"{work_root}/dedup.done"):
        map_with_progress(client, scan_shard, paths, desc="clean scan", unit="shard", work_dir=work_dir, config=config)
        [found] = map_with_progress(client, dedup_dataset, [names], desc="clean dedup", work_dir=work_dir, distance=config.near_dup_distance)
        with fs.open(f"{work_root}/dedup.done", "w") as f:
            f.write(str(sum(found.values())))
    tasks = [ShardTask(name, (path, work_dir)) for name, path in zip(names, paths)]
    stats = run_stage("clean", output_dir, tasks, write_clean_shard, client, config=asdict(config) | {"input": input_dir}, started=started)
    if fs.exists(work_root):
        fs.rm(work_root, recursive=True)
    print(write_funnel(output_dir, "clean", stats, RULES))
    return stats
