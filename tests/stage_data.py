"""Build stage folders directly (no network) for the clean and filter tests."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import zlib

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


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels, with one row of data: a few bytes, whatever size it claims."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(bytes(1 + 3 * width))  # filter byte + one row of zeros
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


HUGE_IMAGES = {"huge": (20000, 20000), "large": (9000, 9000)}  # over PIL's bomb limit; over 64 Mpx but under PIL's limit


def forbid_large_decodes(monkeypatch) -> list[tuple[int, int]]:
    """Make PIL's and OpenCV's pixel decoding fail the test for an image over MAX_DECODE_PIXELS; returns the attempts seen.

    The decoders raise AssertionError, which no stage takes for a bad image: a stage that decodes
    before it reads the header fails the test instead of rejecting the row.
    """
    import cv2
    from PIL import ImageFile

    from dallekit.images import MAX_DECODE_PIXELS, UndecodableImage, header_size

    attempts: list[tuple[int, int]] = []
    pil_load, cv2_imdecode = ImageFile.ImageFile.load, cv2.imdecode

    def load(image):
        if image.width * image.height > MAX_DECODE_PIXELS:
            attempts.append(image.size)
            raise AssertionError(f"PIL decoded a {image.width}x{image.height} image")
        return pil_load(image)

    def imdecode(buffer, flags):
        try:
            width, height = header_size(bytes(buffer))
        except UndecodableImage:
            return cv2_imdecode(buffer, flags)
        if width * height > MAX_DECODE_PIXELS:
            attempts.append((width, height))
            raise AssertionError(f"OpenCV decoded a {width}x{height} image")
        return cv2_imdecode(buffer, flags)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(cv2, "imdecode", imdecode)
    return attempts
