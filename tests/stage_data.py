"""Build stage folders directly (no network) for the clean and filter tests."""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dallekit.demo.synthetic import encode, random_spec, render


def shape_jpeg(seed: int, size: int = 256, resize_to: int | None = None) -> bytes:
    """A synthetic shape as JPEG bytes, optionally a resized copy."""
    image = render(random_spec(random.Random(seed), width=size, height=size))
    if resize_to:
        image = image.resize((resize_to, resize_to), Image.Resampling.BICUBIC)
    return encode(image)


def noise_jpeg(seed: int, size: int = 256) -> bytes:
    """A random-noise JPEG: far from every shape in pHash."""
    rng = random.Random(seed)
    return encode(Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3))))


def downloaded_row(uid: str, caption, image: bytes | None, status: str = "success", size=(256, 256), original=(300, 300), **extra) -> dict:
    """One row with the columns `dallekit download` writes."""
    return {
        "uid": uid, "url": f"http://127.0.0.1/{uid}.jpg", "caption": caption, "key": uid, "status": status,
        "error_message": None if status == "success" else "HTTP Error 404: Not Found",
        "width": size[0] if image else None, "height": size[1] if image else None,
        "original_width": original[0] if image else None, "original_height": original[1] if image else None,
        "sha256": hashlib.sha256(image).hexdigest() if image else None, "jpg": image, **extra,
    }


SCHEMA = {
    "uid": pa.string(), "url": pa.string(), "caption": pa.string(), "key": pa.string(), "status": pa.string(),
    "error_message": pa.string(), "width": pa.int32(), "height": pa.int32(), "original_width": pa.int32(),
    "original_height": pa.int32(), "sha256": pa.string(), "jpg": pa.binary(),
}


STAGE_BY_FOLDER = {"download": "download", "clean": "clean", "filter": "filter", "filtered": "filter"}


def write_stage(folder, shards: list[list[dict]], stage: str | None = None) -> None:
    """Write rows as part-NNNNN.parquet shards with _stats.json and _SUCCESS, as a finished stage would.

    The stage is named by `stage`, else by the folder's name (download, clean, filter), else filter.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for i, rows in enumerate(shards):
        columns = {name: [r.get(name) for r in rows] for name in rows[0]}
        fields = [pa.field(n, SCHEMA.get(n, pa.array(v).type)) for n, v in columns.items()]
        pq.write_table(pa.table(columns, schema=pa.schema(fields)), folder / f"part-{i:05d}.parquet")
    rows_in = sum(len(rows) for rows in shards)
    stats = {"stage": stage or STAGE_BY_FOLDER.get(folder.name, "filter"), "shards": len(shards), "rows_in": rows_in,
             "rows_out": rows_in, "rows_rejected": 0, "reasons": {}, "counters": {}, "seconds": 0.0, "config": {}}
    (folder / "_stats.json").write_text(json.dumps(stats))
    (folder / "_SUCCESS").write_text("")
