"""export: a stage folder -> WebDataset tar shards (`uid.jpg`, `uid.txt`, `uid.json`), for loaders that read WebDataset.

The image member's extension follows the bytes (`jpg`, `png`, `webp`, `gif`, from their magic
bytes; `bin` for anything else), since loaders pick a decoder by extension and the `jpg` column
holds whatever format download encoded (`--encode-format`) or img2dataset fetched (adopt).

The export is one pass of the engine (`pipeline/passes.py`) over the input shards: a task writes
`part-NNNNN.tar` through `io.atomic_file` (fsynced, renamed into place), and its mark then vouches
for the tar by size and footer, so a rerun skips the tars that are whole and writes again those
that are missing, truncated or replaced, even in an export already closed. A sample's key is its `uid`
(checked: letters, digits, `_` and `-` only, since it names the tar members); `uid.txt` is the
caption and `uid.json` every other column that is not bytes (uid, url, scores, the kept
columns; token lists as lists). Rows with no image (a download's failures) are left out and
counted. Members are written in sample order with a fixed mtime, so the same input gives
byte-identical tars. `_export.json` claims the folder with the input's identity (another input
is refused), the run holds the folder's lease (`passes.hold_folder`: one writer at a time), and
`_SUCCESS` closes the export once every tar is whole.
"""

from __future__ import annotations

import io
import json
import math
import re
import tarfile

import fsspec
import pyarrow as pa

from dallekit.config import ExportConfig
from dallekit.errors import BadInputError
from dallekit.io import atomic_file, check_columns, list_shards, read_shard, shard_stem, write_json_atomic
from dallekit.pipeline.passes import LEASE, hold_folder, remove_debris, run_pass
from dallekit.pipeline.shards import check_output_folder, damaged_shards, input_identity, prepare_output, write_success
from dallekit.pipeline.stage import STAGES

KEY = re.compile(r"[A-Za-z0-9_-]+")  # a uid that can name tar members: no dots, slashes or `..`
MAX_KEY_CHARS = 240  # a member's name is the uid and an extension; file systems allow 255 bytes a name
CLAIM = "_export.json"
LAYOUT = 2  # in the claim: the tars are vouched for by the engine's marks (an export without it came before them)
COUNTS = ("rows", "samples", "no_image")


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
    """Write one shard's rows with an image as a WebDataset tar, committed atomically; returns the samples written and left out."""
    table = read_shard(path)
    byte_types = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary)
    meta_columns = [c for c in table.column_names if not any(is_bytes(table.schema.field(c).type) for is_bytes in byte_types)]
    meta = {c: table.column(c).to_pylist() for c in meta_columns}
    images = table.column("jpg").to_pylist()
    written = skipped = 0
    seen: set[str] = set()
    with atomic_file(f"{output_dir.rstrip('/')}/{shard_stem(path)}.tar") as f, tarfile.open(fileobj=f, mode="w") as tar:
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
    return {"rows": len(images), "samples": written, "no_image": skipped}


def _claim_folder(output_dir: str, claim: dict) -> dict:
    """The folder's claim for this input and format (written when new); bad input when it holds anything else."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/{CLAIM}"):
        if [p for p in fs.ls(root, detail=False) if p.rstrip("/").rsplit("/", 1)[-1] != LEASE]:
            raise BadInputError(f"--out {output_dir}: holds files that are not a dallekit export; give an empty or new folder")
        write_json_atomic(claim, f"{root}/{CLAIM}")
        return claim
    try:
        with fs.open(f"{root}/{CLAIM}", "r") as f:
            stored = json.load(f)
    except ValueError:
        stored = None
    if not isinstance(stored, dict):
        raise BadInputError(f"{root}/{CLAIM}: damaged (expected dallekit's JSON object naming the export's input and format); "
                            "give another folder, or remove this one to export afresh")
    if {k: stored.get(k) for k in ("input", "format")} != json.loads(json.dumps(
            {k: claim[k] for k in ("input", "format")})):
        raise BadInputError(f"--out {output_dir}: holds an export of another input or format; give another folder")
    if stored.get("layout") != LAYOUT:  # its marks vouch for nothing: the engine drops them and every tar is written again
        print(f"export: {output_dir} was written by an earlier dallekit version, whose marks do not vouch for its tars; writing them again")
        if fs.exists(f"{root}/_SUCCESS"):
            fs.rm(f"{root}/_SUCCESS")
        write_json_atomic(claim, f"{root}/{CLAIM}")
        return claim
    return stored


def _reopen_if_damaged(output_dir: str, names: list[str]) -> bool:
    """Whether a closed export is whole; if a tar is missing, truncated or replaced, its `_SUCCESS` is removed (the tar is redone)."""
    fs, root = fsspec.core.url_to_fs(output_dir)
    success = f"{root.rstrip('/')}/_SUCCESS"
    if not fs.exists(success):
        return False
    damaged = damaged_shards(output_dir, names)
    if not damaged:
        return True
    print(f"export: {output_dir} was complete but {len(damaged)} of its tars are missing, truncated or replaced "
          f"({damaged[0]}.tar first); writing them again")
    fs.rm(success)
    return False


def export(stage_dir: str, output_dir: str, config: ExportConfig, client) -> dict:
    """Write a finished stage folder's rows as WebDataset tars, one per shard (a rerun resumes); returns the counts."""
    identity = input_identity(stage_dir, tuple(STAGES))
    paths = list_shards(stage_dir)
    check_columns(paths, {"uid", "caption", "jpg"}, "a stage folder with images (download, adopt, clean or filter)")
    fs, root = fsspec.core.url_to_fs(output_dir)
    if fs.exists(f"{root.rstrip('/')}/{CLAIM}"):
        check_output_folder(output_dir, [stage_dir])
    else:
        prepare_output(output_dir, [stage_dir])  # not the input, not a stage folder, writable
    with hold_folder(output_dir, "export"):  # one writer: a second export into the folder is refused, naming this one
        stored = _claim_folder(output_dir, {"input": identity, "format": config.format, "layout": LAYOUT})
        tasks = {shard_stem(p): p for p in paths}
        if _reopen_if_damaged(output_dir, list(tasks)):
            print(f"export: {output_dir} is already complete for this input")
            return stored
        return _write_tars(output_dir, stored, tasks, client)


def _write_tars(output_dir: str, claim: dict, tasks: dict[str, str], client) -> dict:
    """The pass over the input shards (the tars not yet whole), then the counts in the claim and `_SUCCESS`."""
    remove_debris(output_dir)  # an interrupted run's partial tars
    done = run_pass(client, output_dir, None, export_shard, tasks, desc="export", unit="shard", output_dir=output_dir)
    counts = {key: sum(done[name][key] for name in tasks) for key in COUNTS}
    result = {k: claim[k] for k in ("input", "format", "layout")} | counts | {"shards": len(tasks)}
    write_json_atomic(result, f"{output_dir.rstrip('/')}/{CLAIM}")
    write_success(output_dir)
    return result
