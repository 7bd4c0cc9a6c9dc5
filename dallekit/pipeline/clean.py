"""clean: downloaded shards -> repaired captions, global exact and near-duplicate removal.

Three passes, like ingest:

1. scan: one task per shard drops failed downloads, images over 64 Mpx by their header (never
   decoded) and undecodable images, repairs captions
   and takes each image's signature (perceptual hash, 8x8 colour thumbnail, 32x32 detail
   thumbnail) from download's columns, or computes it by decoding the image where a shard lacks
   them (adopt's folders, older downloads); it writes only these columns to `_work/scan/`
   (the detail thumbnails in a file of their own per shard, `<shard>.detail.arrow`).
2. dedup (`dallekit.pipeline.dedup`; with the scan, the stage's global pass): distributed passes over the hashes (never the images)
   check that every uid is unique and mark, in uid order, exact duplicates (same sha256) and
   near duplicates (pHash within `--near-dup-distance` bits of a kept image whose colour
   thumbnail agrees within `--near-dup-color-distance` and whose detail thumbnail, aligned,
   within `--near-dup-detail-distance` in every block), writing the marks per shard to
   `_work/dups/`. No task holds more than a bounded number of rows.
3. shards: the stage runner joins each shard with its scan and dedup results.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import asdict

import fsspec
import ftfy
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.config import CleanConfig, output_options
from dallekit.images import DETAIL_BYTES, MAX_DECODE_PIXELS, THUMB_BYTES, signature_columns
from dallekit.io import read_rows_file, read_shard, shard_schema, shard_stem, write_rows_file, write_table_atomic
from dallekit.pipeline.dedup import dedup
from dallekit.pipeline.fetch import row_outcome
from dallekit.pipeline.passes import run_pass, work_dir
from dallekit.pipeline.shards import ShardResult
from dallekit.pipeline.stage import Plan, Stage, run_plan, shard_tasks
from dallekit.pipeline.uids import check_unique_uids

# Reasons in the order the rules run; the funnel follows this order.
RULES = [
    "robots_txt", "opted_out", "rate_limited", "failed_to_download", "failed_to_resize", "image_too_large", "undecodable", "empty_caption", "caption_too_long",
    "boilerplate_caption", "duplicate_image", "near_duplicate_image",
]
SIGNATURE = ["phash", "color_thumb", "detail_thumb"]  # what the near-duplicate rule compares (dallekit.images.Signature)
SIGNATURE_TYPES = {"phash": pa.uint64(), "color_thumb": pa.binary(THUMB_BYTES), "detail_thumb": pa.binary(DETAIL_BYTES)}
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
    """Pass 1: per-row reason (download, decode, caption), repaired caption and the image's signature columns; returns rows."""
    stored = _stored_signature(path)
    messages_kept = "error_message" in shard_schema(path)[0].names  # what download's failed rows say: robots_txt, rate_limited, ...
    table = read_shard(path, columns=["uid", "caption", "status", "sha256"] + (["error_message"] if messages_kept else [])
                       + (SIGNATURE + ["width", "height"] if stored else ["jpg"]))
    check_unique_uids(table.column("uid"), path.rstrip("/").rsplit("/", 1)[-1])
    statuses = table.column("status").to_pylist()
    messages = table.column("error_message").to_pylist() if messages_kept else [None] * table.num_rows
    failures: list[str | None] = []  # why a row has no signature: image_too_large (by its header) or undecodable
    if stored:  # download computed them from the same bytes with the same function: no image is decoded
        signature = {name: table.column(name).combine_chunks() for name in SIGNATURE}
        # download hashes what it stores; a stored image it could not hash is too large to decode, or undecodable
        failures = ["image_too_large" if (w or 0) * (h or 0) > MAX_DECODE_PIXELS else None
                    for w, h in zip(table.column("width").to_pylist(), table.column("height").to_pylist())]
    else:  # adopt's folders and older downloads: decode each image
        signature = signature_columns([image if status == "success" else None
                                       for status, image in zip(statuses, table.column("jpg").to_pylist())], failures)
    reasons, captions = [], []
    valid = signature["phash"].is_valid().to_pylist()
    for i, (status, caption, decoded) in enumerate(zip(statuses, table.column("caption").to_pylist(), valid)):
        fixed = repair_caption(caption, config.lowercase)
        if status != "success":
            reason = status if status in RULES else "failed_to_download"
            outcome = row_outcome(messages[i]) if reason == "failed_to_download" else None
            reason = outcome if outcome in RULES else reason
        else:
            reason = None if decoded else (failures[i] or "undecodable")
        reasons.append(reason or caption_reason(fixed, config))
        captions.append(fixed)
    detail = signature.pop("detail_thumb")  # 3 KB a row: a file of its own, whose rows the dedup reads only for its candidate pairs
    write_rows_file(detail, f"{work_dir}/scan/{shard_stem(path)}.detail.arrow")
    signature["detail_key"] = pa.array([detail_key(d) for d in detail.to_pylist()], pa.uint64())  # what the collapse compares
    scan = pa.table({"uid": table.column("uid"), "reason": pa.array(reasons, pa.string()), "caption": pa.array(captions, pa.string()),
                     "sha256": table.column("sha256")} | signature)
    write_table_atomic(scan, f"{work_dir}/scan/{shard_stem(path)}.parquet")
    return table.num_rows


def _scan_task(path: str, work_dir: str, config: CleanConfig) -> dict:
    """scan_shard as a task of the engine's `scan` pass: its two files are vouched for by the task's mark."""
    return {"rows": scan_shard(path, work_dir, config)}


def detail_key(detail: bytes | None) -> int | None:
    """A 64-bit hash of a detail thumbnail: the dedup collapses rows by it rather than by the 3 KB themselves."""
    return None if detail is None else int.from_bytes(hashlib.blake2b(detail, digest_size=8).digest(), "little")


def _stored_signature(path: str) -> bool:
    """Whether the shard has download's signature columns, with the types clean writes (phash, color_thumb, detail_thumb)."""
    schema = shard_schema(path)[0]
    return {"width", "height"} <= set(schema.names) and all(
        name in schema.names and schema.field(name).type == SIGNATURE_TYPES[name] for name in SIGNATURE)


def write_clean_shard(payload: tuple[str, str]) -> ShardResult:
    """Pass 3: one shard joined with its scan and dedup marks; kept rows get the repaired caption."""
    path, work_dir = payload
    name = shard_stem(path)
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
    table = table.drop_columns([name for name in SIGNATURE if name in table.column_names])
    table = table.append_column("phash", scan.column("phash")).append_column("color_thumb", scan.column("color_thumb"))
    table = table.append_column("detail_thumb", read_rows_file(f"{work_dir}/scan/{name}.detail.arrow"))
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


STAGE = Stage("clean", ("download", "adopt"), frozenset({"uid", "caption", "status", "sha256", "jpg"}), "shards from `dallekit download`",
              write_clean_shard, rules=tuple(RULES))


def plan_clean(input_dir: str, config: CleanConfig) -> Plan:
    """The downloaded shards to clean, with the scan and dedup passes as the global pass; checks the input first."""
    identity, paths, _ = STAGE.input_of(input_dir)
    names = [shard_stem(p) for p in paths]

    def global_pass(client, output_dir: str) -> int:  # passes 1 and 2: the marked rows
        scratch = work_dir(output_dir)  # a rerun skips the shards whose scan files its marks vouch for
        run_pass(client, scratch, "scan", _scan_task, {shard_stem(p): p for p in paths}, desc="clean scan", unit="shard",
                 work_dir=scratch, config=config)
        found = dedup(client, names, scratch, config.near_dup_distance, config.near_dup_color_distance,
                      config.near_dup_detail_distance)
        return sum(found.values())

    return Plan(inputs=[input_dir], fingerprint={"input": identity, "options": output_options(config)},
                stats_config=asdict(config) | {"input": input_dir}, global_pass=global_pass,
                tasks=lambda _, output_dir: shard_tasks(paths, lambda p: (p, work_dir(output_dir))))


def clean(input_dir: str, output_dir: str, config: CleanConfig, client, plan: Plan | None = None) -> dict:
    """Run the clean stage over every downloaded shard of `input_dir`."""
    return run_plan(STAGE, plan or plan_clean(input_dir, config), output_dir, client, config.overwrite)
