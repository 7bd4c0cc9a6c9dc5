"""clean's near-duplicate rule on real small pictures: distinct pictures dropped vs copies caught, before and after the detail check.

Data: the 64 px emoji PNGs of npm's `emoji-datasource-apple@16.0.0` and `emoji-datasource-google@16.0.0`
(`npm pack`, cached under .bench/emoji/; the npm registry is the only network use), each stored
as `dallekit download` stores it (its Resizer: matted on white, 256 px, JPEG q95).

1. distinct: every emoji of a vendor, cleaned. A near-duplicate reject whose picture differs from
   the kept one it duplicates by PSNR < 30 dB (64x64 RGB; a re-encoded copy is above 30) is a
   distinct picture dropped.
2. copies: a seeded sample of emoji and of generated photo-like pictures (320-640 px), each with
   three copies: resized (0.5-2x), re-encoded as JPEG (quality 70-95), cropped by 1-4% of each
   side in all; originals and copies stored as download stores them and cleaned together. A copy
   is caught when clean rejects it as a duplicate of its original or of another of its copies.

Both runs use clean with the detail check (the default) and without it (`near_dup_detail_distance`
255: the pHash + colour rule as before). The last line is ratio=<copies caught / distinct pictures
kept> with the default options.

    python benchmarks/near_dup_quality.py [--emoji 300] [--photos 150] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from dallekit.config import CleanConfig, ClusterConfig, DownloadConfig
from dallekit.pipeline.clean import clean
from dallekit.pipeline.cluster import dask_client
from dallekit.resize import Resizer

CACHE = Path(__file__).resolve().parent.parent / ".bench" / "emoji"
PACKAGES = {"apple": "emoji-datasource-apple@16.0.0", "google": "emoji-datasource-google@16.0.0"}
DISTINCT_PSNR = 30.0


def emoji_pngs(vendor: str) -> dict[str, bytes]:
    """{file name: PNG bytes} of a vendor's 64 px emoji, from the npm tarball (fetched once into CACHE)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    package = PACKAGES[vendor]
    tarball = CACHE / f"{package.replace('@', '-')}.tgz"
    if not tarball.exists():
        subprocess.run(["npm", "pack", package, "--pack-destination", str(CACHE)], check=True, capture_output=True)
    prefix = f"package/img/{vendor}/64/"
    with tarfile.open(tarball) as tar:
        return {m.name[len(prefix):]: tar.extractfile(m).read() for m in tar.getmembers()
                if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".png")}


def photo(seed: int) -> bytes:
    """A photo-like JPEG: smooth noise at four scales and a few solid shapes, 320-640 x 240-480 px."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(320, 640)), int(rng.integers(240, 480))
    img = np.zeros((h, w, 3))
    for octave, amp in ((3, 1.0), (8, 0.5), (24, 0.25), (64, 0.12)):
        grid = Image.fromarray((rng.random((octave, octave, 3)) * 255).astype(np.uint8))
        img += amp * np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), float) / 255
    pil = Image.fromarray((img / img.max() * 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, 6))):
        x, y, s = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(20, 120))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + s, y + s), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return encoded(pil, "JPEG", 90)


def encoded(image: Image.Image, fmt: str, quality: int) -> bytes:
    """PNG as is, or JPEG (transparency matted on white first, as any JPEG writer must)."""
    out = io.BytesIO()
    if fmt == "JPEG":
        rgba = image.convert("RGBA")
        Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB").save(out, "JPEG", quality=quality)
    else:
        image.save(out, "PNG")
    return out.getvalue()


def copies(data: bytes, rng: random.Random, fmt: str) -> dict[str, bytes]:
    """A resized (0.5-2x), a re-encoded (JPEG q70-95) and a cropped (1-4% of each side in all) copy."""
    image = Image.open(io.BytesIO(data))
    image.load()
    w, h = image.size
    f = rng.uniform(0.5, 2.0)
    resized = image.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.LANCZOS)
    c = rng.uniform(0.01, 0.04)
    left, top = rng.uniform(0, c), rng.uniform(0, c)
    cropped = image.crop((round(w * left), round(h * top), w - round(w * (c - left)), h - round(h * (c - top))))
    return {"resized": encoded(resized, fmt, 90), "reencoded": encoded(image, "JPEG", rng.randint(70, 95)),
            "cropped": encoded(cropped, fmt, 90)}


def write_download(folder: Path, rows: list[tuple[str, bytes]], shard_rows: int = 1000) -> dict[str, bytes]:
    """(uid, source bytes) rows stored as `dallekit download` stores them, as a finished download folder; {uid: stored bytes}."""
    resizer, stored = Resizer(DownloadConfig()), {}
    for uid, data in rows:
        out = resizer(io.BytesIO(data))
        if out[0] is None:
            raise RuntimeError(f"{uid}: {out[-1]}")
        stored[uid] = out[0]
    folder.mkdir(parents=True)
    uids = list(stored)
    for i in range(0, len(uids), shard_rows):
        part = uids[i : i + shard_rows]
        images = [stored[u] for u in part]
        pq.write_table(pa.table({
            "uid": part, "url": [f"http://127.0.0.1/{u}" for u in part], "caption": [f"picture {u}" for u in part], "key": part,
            "status": ["success"] * len(part), "error_message": pa.array([None] * len(part), pa.string()),
            "width": pa.array([256] * len(part), pa.int32()), "height": pa.array([256] * len(part), pa.int32()),
            "original_width": pa.array([256] * len(part), pa.int32()), "original_height": pa.array([256] * len(part), pa.int32()),
            "sha256": [hashlib.sha256(b).hexdigest() for b in images], "jpg": pa.array(images, pa.binary()),
        }), folder / f"part-{i // shard_rows:05d}.parquet")
    stats = {"stage": "download", "shards": -(-len(uids) // shard_rows), "rows_in": len(uids), "rows_out": len(uids),
             "rows_rejected": 0, "reasons": {}, "counters": {}, "seconds": 0.0, "config": {}}
    (folder / "_stats.json").write_text(json.dumps(stats))
    (folder / "_SUCCESS").write_text("")
    return stored


def rejects(folder: Path) -> pd.DataFrame:
    """clean's rejected rows (uid, reason, duplicate_of)."""
    files = sorted((folder / "_rejects").glob("*.parquet"))
    if not files:
        return pd.DataFrame(columns=["uid", "reason", "duplicate_of"])
    return pd.concat([pd.read_parquet(f, columns=["uid", "reason", "duplicate_of"]) for f in files])


def psnr(a: bytes, b: bytes) -> float:
    """PSNR (dB) of two stored images at 64x64 RGB."""
    x, y = (cv2.resize(cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR), (64, 64), interpolation=cv2.INTER_AREA).astype(float)
            for d in (a, b))
    mse = ((x - y) ** 2).mean()
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


def cleaned(work: Path, name: str, config: CleanConfig, client) -> pd.DataFrame:
    """clean the download folder work/name with `config`; its rejects."""
    out = work / f"clean-{name}-{config.near_dup_detail_distance:g}"
    clean(str(work / name), str(out), config, client)
    return rejects(out)


def distinct_dropped(work: Path, vendor: str, config: CleanConfig, client, stored: dict[str, bytes]) -> tuple[int, int, list[str]]:
    """(distinct pictures dropped, rows, a few examples) for one vendor's emoji."""
    near = cleaned(work, vendor, config, client)
    near = near[near["reason"] == "near_duplicate_image"]
    dropped = [(u, o, psnr(stored[u], stored[o])) for u, o in zip(near["uid"], near["duplicate_of"])]
    distinct = [(u, o, p) for u, o, p in dropped if p < DISTINCT_PSNR]
    return len(distinct), len(stored), [f"{u} as a copy of {o} ({p:.1f} dB)" for u, o, p in distinct[:3]]


def caught(work: Path, config: CleanConfig, client, group: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Per (source, kind): (copies caught, copies)."""
    dropped = cleaned(work, "copies", config, client).set_index("uid")["duplicate_of"].to_dict()
    out: dict[str, list[int]] = {}
    for uid, original in group.items():
        if uid == original:
            continue
        key = uid.split("/")[0] + " " + uid.rsplit("-", 1)[1]
        hit = uid in dropped and group.get(dropped[uid]) == original
        out.setdefault(key, [0, 0])[0] += hit
        out[key][1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(out.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emoji", type=int, default=300, help="emoji with copies")
    parser.add_argument("--photos", type=int, default=150, help="photo-like pictures with copies")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dallekit-neardup-"))
    rng = random.Random(0)
    stored, pngs = {}, {}
    for vendor in PACKAGES:
        pngs[vendor] = emoji_pngs(vendor)
        stored[vendor] = write_download(work / vendor, [(f"{vendor}/{n}", d) for n, d in sorted(pngs[vendor].items())])
    rows, group = [], {}
    sample = rng.sample(sorted(pngs["apple"].items()), args.emoji)
    sources = [(f"emoji/{n}", d, "PNG") for n, d in sample] + [(f"photo/{s:04d}", photo(s), "JPEG") for s in range(args.photos)]
    for uid, data, fmt in sources:
        rows.append((f"{uid}-0original", data))
        group[f"{uid}-0original"] = f"{uid}-0original"
        for kind, copy in copies(data, rng, fmt).items():
            rows.append((f"{uid}-{kind}", copy))
            group[f"{uid}-{kind}"] = f"{uid}-0original"
    write_download(work / "copies", rows)

    before, after = CleanConfig(near_dup_detail_distance=255.0), CleanConfig()
    ratio = None
    with dask_client(ClusterConfig(workers=args.workers), quiet=True) as client:
        for label, config in (("pHash + colour (before)", before), ("pHash + colour + detail (default)", after)):
            lost, total = 0, 0
            for vendor in PACKAGES:
                n, rows_, examples = distinct_dropped(work, vendor, config, client, stored[vendor])
                lost, total = lost + n, total + rows_
                print(f"{label}: {vendor} emoji: {n} of {rows_} distinct pictures dropped ({n / rows_:.2%}); e.g. {examples}")
            per_kind = caught(work, config, client, group)
            hits, copies_ = sum(h for h, _ in per_kind.values()), sum(n for _, n in per_kind.values())
            print(f"{label}: copies caught {hits} of {copies_} ({hits / copies_:.1%}): "
                  + ", ".join(f"{k} {h}/{n}" for k, (h, n) in per_kind.items()))
            print(f"{label}: distinct dropped {lost / total:.2%}, copies caught {hits / copies_:.1%}")
            ratio = (hits / copies_) / (1 - lost / total)
    shutil.rmtree(work, ignore_errors=True)
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
