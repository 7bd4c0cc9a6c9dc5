"""export: a stage folder -> WebDataset tar shards (`uid.jpg`, `uid.txt`, `uid.json`), for loaders that read WebDataset.

The image member's extension follows the bytes (`jpg`, `png`, `webp`, `gif`, from their magic
bytes; `bin` for anything else), since loaders pick a decoder by extension and the `jpg` column
holds whatever format download encoded (`--encode-format`) or img2dataset fetched (adopt).

One Dask task per input shard writes `part-NNNNN.tar` under a temporary name and renames it into
place, so a rerun skips the tars already there and writes the rest. A sample's key is its `uid`
(checked: letters, digits, `_` and `-` only, since it names the tar members); `uid.txt` is the
caption and `uid.json` every other column that is not bytes (uid, url, scores, the kept
columns; token lists as lists). Rows with no image (a download's failures) are left out and
counted. Members are written in sample order with a fixed mtime, so the same input gives
byte-identical tars. `_export.json` claims the folder with the input's identity, a mark per tar
in `_progress/` follows its rename, and `_SUCCESS` closes the export.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
import uuid

import fsspec
import pyarrow as pa

from dallekit.config import BadInputError, ExportConfig
from dallekit.io import check_columns, list_shards, read_shard, shard_stem, write_json_atomic
from dallekit.pipeline.passes import map_with_progress
from dallekit.pipeline.shards import input_identity, prepare_output
from dallekit.pipeline.stage import STAGES

KEY = re.compile(r"[A-Za-z0-9_-]+")  # a uid that can name tar members: no dots, slashes or `..`
MAX_KEY_CHARS = 240  # a member's name is the uid and an extension; file systems allow 255 bytes a name
CLAIM = "_export.json"


def _json_value(value):
    """A column value as JSON: NaN and infinities become null (JSON has neither), inside lists and structs too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def image_extension(data: bytes) -> str:
    """The member extension of image bytes, from their magic bytes (JPEG, PNG, WebP or GIF; anything else is bin)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return "bin"  # a loader decodes by extension: bytes of no known format must not pass for a JPEG


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def _check_key(path: str, uid) -> None:
    """Bad input unless the uid can name a WebDataset sample's tar members, saying which rule it breaks."""
    if not isinstance(uid, str) or not uid:
        raise BadInputError(f"{path}: uid {uid!r} cannot name a WebDataset sample (expected a non-empty string)")
    if not KEY.fullmatch(uid):
        raise BadInputError(f"{path}: uid {uid[:40]!r} cannot name a WebDataset sample (expected letters, digits, _ or -)")
    if len(uid) > MAX_KEY_CHARS:
        raise BadInputError(f"{path}: uid {uid[:40]!r}... has {len(uid)} characters; a WebDataset sample's name takes at most {MAX_KEY_CHARS}")


def export_shard(path: str, output_dir: str) -> dict:
    """Write one shard's rows with an image as a WebDataset tar; returns the samples written and left out."""
    table = read_shard(path)
    byte_types = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    meta_columns = [c for c in table.column_names if not any(is_bytes(table.schema.field(c).type) for is_bytes in byte_types)]
    meta = {c: table.column(c).to_pylist() for c in meta_columns}
    images = table.column("jpg").to_pylist()
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    name = shard_stem(path)
    buffer = io.BytesIO()
    written = skipped = 0
    seen: set[str] = set()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i, image in enumerate(images):
            uid = meta["uid"][i]
            _check_key(path, uid)
            if uid in seen:  # two samples of one key would merge in a WebDataset reader
                raise BadInputError(f"{path}: uid {uid} appears twice; expected the unique uids of a dallekit stage")
            seen.add(uid)
            if image is None:
                skipped += 1
                continue
            record = {c: _json_value(meta[c][i]) for c in meta_columns}
            _add(tar, f"{uid}.{image_extension(image)}", image)  # the column is named jpg whatever download's --encode-format was
            _add(tar, f"{uid}.txt", (meta["caption"][i] or "").encode("utf-8"))
            _add(tar, f"{uid}.json", json.dumps(record, ensure_ascii=False, sort_keys=True, default=str, allow_nan=False).encode("utf-8"))
            written += 1
    tmp = f"{root}/_tmp-{uuid.uuid4().hex}-{name}.tar"
    with fs.open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    fs.mv(tmp, f"{root}/{name}.tar")
    mark = {"shard": name, "rows": len(images), "samples": written, "no_image": skipped}
    write_json_atomic(mark, f"{root}/_progress/{name}.json")  # after the tar: a tar without its mark is written again
    return mark


def export(stage_dir: str, output_dir: str, config: ExportConfig, client) -> dict:
    """Write a finished stage folder's rows as WebDataset tars, one per shard (a rerun resumes); returns the counts."""
    identity = input_identity(stage_dir, tuple(STAGES))
    paths = list_shards(stage_dir)
    check_columns(paths, {"uid", "caption", "jpg"}, "a stage folder with images (download, adopt, clean or filter)")
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    claim = {"input": identity, "format": config.format}
    if fs.exists(f"{root}/{CLAIM}"):
        try:
            with fs.open(f"{root}/{CLAIM}", "r") as f:
                stored = json.load(f)
        except ValueError:
            stored = {}
        if not isinstance(stored, dict) or {k: stored.get(k) for k in claim} != json.loads(json.dumps(claim)):
            raise BadInputError(f"--out {output_dir}: holds an export of another input or format; give another folder")
        if fs.exists(f"{root}/_SUCCESS"):
            print(f"export: {output_dir} is already complete for this input")
            return stored
    else:
        prepare_output(output_dir, [stage_dir])  # not the input, not a stage folder, writable
        if fs.ls(root, detail=False):
            raise BadInputError(f"--out {output_dir}: holds files that are not a dallekit export; give an empty or new folder")
        write_json_atomic(claim, f"{root}/{CLAIM}")
    for p in fs.glob(f"{root}/_tmp-*"):
        fs.rm(p)  # an interrupted run's partial tars
    fs.makedirs(f"{root}/_progress", exist_ok=True)
    marks = {}
    for p in paths:
        try:
            with fs.open(f"{root}/_progress/{shard_stem(p)}.json", "r") as f:
                marks[p] = json.load(f)
        except (FileNotFoundError, ValueError):  # not written yet, or damaged by hand: write that tar again
            pass
    pending = [p for p in paths if not (isinstance(marks.get(p), dict) and {"rows", "samples", "no_image"} <= set(marks[p]))]
    if len(pending) < len(paths):
        print(f"export: resuming, {len(paths) - len(pending)} of {len(paths)} tars already written")
    written = map_with_progress(client, export_shard, pending, desc="export", unit="shard", already_done=len(paths) - len(pending),
                                output_dir=output_dir)
    marks.update(zip(pending, written))
    result = claim | {key: sum(marks[p][key] for p in paths) for key in ("rows", "samples", "no_image")} | {"shards": len(paths)}
    write_json_atomic(result, f"{root}/{CLAIM}")
    with fs.open(f"{root}/_SUCCESS", "w") as f:
        f.write("")
    return result
