"""Searching an index: the CLIP of its embeddings embeds a text or an image, faiss finds the nearest images, and the hits are
joined to the rows of the stage the embeddings were computed from, reading only the shards that hold a hit.

An index is refused when its folder is not a finished index, its files changed since the build,
or its embeddings folder's identity changed (re-embedded, rerun): the ids would name other rows.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dallekit.errors import BadInputError
from dallekit.images import UndecodableImage, decode_rgb
from dallekit.io import atomic_file, open_shard, read_row_groups
from dallekit.pipeline.embeddings import check_model, describe_model, model_identity
from dallekit.pipeline.shards import fingerprint_content, input_identity, read_fingerprint
from dallekit.search.build import EMBED_STAGES, FORMAT, INDEX_FILE, INFO_FILE, ROWS_FILE

REBUILD = "rebuild with `dallekit index`"


def read_info(index_dir: str) -> dict:
    """A finished index folder's index.json, its files checked by size; bad input naming what is missing or changed."""
    if not os.path.isdir(index_dir):
        raise BadInputError(f"{index_dir}: no such index folder; build one with `dallekit index EMBED_DIR --out {index_dir}`")
    path = os.path.join(index_dir, INFO_FILE)
    if not os.path.isfile(path):
        raise BadInputError(f"{index_dir}: not a finished search index (no {INFO_FILE}); build it with `dallekit index EMBED_DIR --out {index_dir}`")
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("format") != FORMAT:
            raise ValueError
        files, rows, dim = info["files"], int(info["rows"]), int(info["dim"])
        embeddings, search = info["embeddings"], info.get("search") or {}
        # a hand-edited index.json fails here, in one line, not later in a lookup
        if not (isinstance(files, dict) and all(isinstance(files.get(n, {}), dict) for n in (INDEX_FILE, ROWS_FILE)) and isinstance(embeddings, dict) and isinstance(embeddings["path"], str)
                and isinstance(embeddings["identity"], dict) and isinstance(info["model"], dict) and isinstance(search, dict)
                and all(n in ("nprobe", "efSearch") and isinstance(v, int) and v >= 1 for n, v in search.items())):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise BadInputError(f"{path}: not a dallekit search index ({FORMAT}); {REBUILD}") from None
    for name in (INDEX_FILE, ROWS_FILE):
        file = os.path.join(index_dir, name)
        recorded = (files.get(name) or {}).get("bytes")
        if not os.path.isfile(file) or os.path.getsize(file) != recorded:
            raise BadInputError(f"{file}: missing or changed since the index was built ({recorded} bytes recorded); {REBUILD}")
    if rows < 1 or dim < 1:
        raise BadInputError(f"{path}: records {rows} rows of {dim} dimensions; {REBUILD}")
    return info


def check_current(index_dir: str, info: dict) -> str:
    """The embeddings folder's path when its identity is the one the index was built from; bad input otherwise."""
    embed_dir = info["embeddings"]["path"]
    try:
        current = input_identity(embed_dir, EMBED_STAGES)
    except BadInputError as err:
        raise BadInputError(f"{index_dir}: its embeddings folder is not readable now ({err}); {REBUILD}") from None
    if _canonical(current) != _canonical(info["embeddings"]["identity"]):
        raise BadInputError(f"{index_dir}: older than its embeddings folder {embed_dir} (embedded again or rerun since the index was built); "
                            f"{REBUILD} {embed_dir} --out {index_dir}")
    return embed_dir


def stage_of(embed_dir: str) -> str:
    """The stage folder an embeddings folder was computed from (its fingerprint's input), checked to be as it was then."""
    recorded = (read_fingerprint(embed_dir) or {}).get("input")
    if not isinstance(recorded, dict) or not recorded.get("path"):
        raise BadInputError(f"{embed_dir}: its fingerprint records no input folder; cannot tell which stage folder the embeddings were computed from")
    stage_dir = recorded["path"]
    kinds = (recorded["stage"],) if recorded.get("stage") else ()
    try:
        now = input_identity(stage_dir, kinds, required=bool(kinds))
    except BadInputError as err:
        raise BadInputError(f"{embed_dir}: the stage folder its embeddings come from is not readable now ({err})") from None
    if _canonical(now) != _canonical(recorded):
        raise BadInputError(f"{stage_dir}: changed since {embed_dir} was computed from it (rerun); "
                            f"run `dallekit embed {stage_dir} --out DIR`, then {REBUILD} DIR")
    return stage_dir


def _canonical(identity: dict) -> object:
    """An identity without its locations, as JSON would give it back, to compare a fresh one with a recorded one."""
    return json.loads(json.dumps(fingerprint_content(identity), sort_keys=True, default=str))


class OpenShards:
    """Embeddings shards opened once per index (their footers parsed once), the most recently used `limit` of them kept."""

    def __init__(self, embed_dir: str, limit: int = 256):
        self.embed_dir, self.limit = embed_dir, limit
        self.opened: OrderedDict[str, pq.ParquetFile] = OrderedDict()

    def get(self, name: str) -> tuple[str, pq.ParquetFile]:
        """(path, open ParquetFile) of the shard named `name` (its stem)."""
        path = os.path.join(self.embed_dir, f"{name}.parquet")
        if path in self.opened:
            self.opened.move_to_end(path)
        else:
            self.opened[path] = open_shard(path)
            if len(self.opened) > self.limit:
                self.opened.popitem(last=False)
        return path, self.opened[path]


def take(path: str, positions: np.ndarray, columns: list[str] | None = None, shard: pq.ParquetFile | None = None) -> pa.Table:
    """Rows of a Parquet file at `positions` (in that order), reading only the row groups that hold them (`shard`: the file, already open)."""
    shard = shard or open_shard(path)
    sizes = [shard.metadata.row_group(i).num_rows for i in range(shard.metadata.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    positions = np.asarray(positions, np.int64)
    if len(positions) and (positions.min() < 0 or positions.max() >= starts[-1]):
        raise BadInputError(f"{path}: holds {starts[-1]} rows, fewer than the index expects; {REBUILD}")
    groups = sorted(set(np.searchsorted(starts, positions, side="right") - 1))
    table = read_row_groups(shard, path, groups, columns)
    group_start = {g: int(sum(sizes[h] for h in groups if h < g)) for g in groups}  # where each group begins in the table read
    local = [group_start[g] + p - starts[g] for g, p in zip(np.searchsorted(starts, positions, side="right") - 1, positions)]
    return table.take(pa.array(local, pa.int64()))


def stored_rows(shards: OpenShards, names: np.ndarray, rows: np.ndarray, columns: list[str]) -> pa.Table:
    """Columns of the embeddings rows (shard stem, row), in the order given, reading only the row groups that hold them."""
    parts, order = [], []
    for name in dict.fromkeys(names):  # each shard once, in first-hit order
        at = np.flatnonzero(names == name)
        path, shard = shards.get(name)
        parts.append(take(path, rows[at], columns, shard))
        order.append(at)
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(order), kind="stable"), pa.int64()))


def query_image(image: Any):
    """A PIL image from a path, bytes or a PIL image; a file's size is read from its header before it is decoded."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    where = "the image bytes"
    if isinstance(image, (str, os.PathLike)):
        where = f"--image {image}"
        if os.path.exists(image) and not os.path.isfile(image):  # /dev/zero or a FIFO: reading it would never end
            raise BadInputError(f"{where}: not a regular file; expected an image file")
        try:
            image = Path(image).read_bytes()
        except OSError as err:
            raise BadInputError(f"{where}: cannot read it ({err.strerror})") from None
    try:
        return decode_rgb(bytes(image))  # checks the header's size first (images.check_decode_size): nothing decoded over 64 Mpx
    except UndecodableImage as err:
        raise BadInputError(f"{where}: not an image dallekit decodes ({err})") from None


def clip_identity(info: dict, embed_dir: str, model: str | None, pretrained: str | None, checkpoint: str | None) -> dict:
    """The CLIP to embed queries with: the index's, or the one the options name, which must be the same model."""
    stored = info["model"]
    if model or pretrained or checkpoint:
        given = model_identity(model or stored["model"], pretrained, checkpoint)
        option = "--clip-checkpoint" if checkpoint else "--clip-model/--clip-pretrained"
        check_model(embed_dir, given, f"{option} (index {info['embeddings']['path']})")
        return given
    if stored.get("checkpoint"):
        path = stored.get("path")
        if not path or not os.path.exists(path):
            raise BadInputError(f"the index's CLIP, {describe_model(stored)}, is not there now; pass --clip-checkpoint with the same model")
        given = model_identity(stored["model"], None, path)
        check_model(embed_dir, given, f"the index's --clip-checkpoint {path}")
        return given
    return stored


def hits_frame(stage_dir: str, hits: pd.DataFrame) -> pd.DataFrame:
    """The hits (uid, score, shard) joined to their rows of the stage folder, reading only the shards that hold one."""
    parts = []
    for shard, group in hits.groupby("shard", sort=False):
        path = os.path.join(stage_dir, f"{shard}.parquet")
        if not os.path.isfile(path):
            raise BadInputError(f"{path}: missing; the embeddings' stage folder changed since they were computed: embed again, then {REBUILD}")
        shard = open_shard(path)
        uids = read_row_groups(shard, path, list(range(shard.metadata.num_row_groups)), ["uid"]).column("uid")
        where = pc.index_in(pa.array(group["uid"].tolist(), pa.string()), value_set=uids)
        if where.null_count:
            missing = group["uid"].tolist()[where.is_null().to_numpy(zero_copy_only=False).argmax()]
            raise BadInputError(f"{path}: has no row with uid {missing}; the stage folder changed since it was embedded: embed again, then {REBUILD}")
        rows = take(path, where.to_numpy(zero_copy_only=False), shard=shard).to_pandas()  # the row groups holding a hit, images included
        parts.append(group[["uid", "score"]].reset_index(drop=True).join(rows.drop(columns=["uid"])))
    joined = pd.concat(parts, ignore_index=True).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    first = [c for c in ("uid", "score", "caption", "jpg") if c in joined.columns]
    return joined[first + [c for c in joined.columns if c not in first]]


def write_grid(hits: pd.DataFrame, path: str, side: int = 128) -> None:
    """The hits' images, each labelled with its score and caption, as one PNG (an undecodable image is a grey tile)."""
    from dallekit.images import bytes_grid

    images = [hit.get("jpg") for _, hit in hits.iterrows()]
    labels = [f"{hit['score']:.3f} {hit.get('caption') or ''}" for _, hit in hits.iterrows()]
    grid = bytes_grid(images, labels, columns=min(8, max(1, len(images))), side=side)
    with atomic_file(os.path.abspath(path)) as f:
        grid.save(f, format="PNG")
