"""A user's folder of short-captioned pictures through ingest, download, clean and filter with the defaults.

The pictures and captions are real: the emoji PNGs of emoji-datasource-google@16.0.0 (or -apple,
`--set apple`), fetched at run time with `npm pack` into .bench/npm/ (gitignored). The script
lays out a folder as a user would: `img/<code points>.png` and a same-named `.txt` holding the
emoji's Unicode name, lowercased, as in the issue ("google emoji: rabbit face"; skin-tone
variants add CLDR's tone name: "google emoji: waving hand sign, medium skin tone"). The package's
pictures are 64 px; `--side 256` (the default) scales them up (Lanczos) to the size of the
issue's pictures, which passed the image rules, since `filter --min-side` defaults to 256;
`--side 64` keeps them as shipped.

Then `ingest FOLDER` (file:// URLs, allowed for a folder input), `download`, `clean` and
`filter --no-clip` run with their defaults on a local Dask cluster of 2 workers, through the
same stage functions `dallekit run` calls. The filter runs twice on the same clean output: with
the defaults and with the previous language rule (`--min-lang-score 0 --min-lang-letters 0`).
It prints each stage's rows in, out and per reason, the filter's language counters, and the
share of clean's input that clean and filter keep, also without clean's `near_duplicate_image`
rejects (another change is reworking that pass). Last line: ratio=<that kept share with the
defaults / the same share with the previous language rule>.

    python benchmarks/real_folder_funnel.py [--set google|apple] [--side 256] [--limit N]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from language_rule import npm_pack
from PIL import Image

from dallekit.config import CleanConfig, ClusterConfig, DownloadConfig, FilterConfig, IngestConfig
from dallekit.pipeline.clean import clean
from dallekit.pipeline.cluster import dask_client
from dallekit.pipeline.download import download
from dallekit.pipeline.filter import filter
from dallekit.pipeline.ingest import ingest

TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
         "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}  # CLDR's English names of the modifiers


def captioned_images(emoji: list[dict], which: str) -> dict[str, str]:
    """{image file name in the package: caption} for every emoji (and skin-tone variant) the set has a picture of."""
    out = {}
    for e in emoji:
        if not e.get("name"):
            continue
        name = e["name"].lower()
        if e.get(f"has_img_{which}"):
            out[e["image"]] = f"{which} emoji: {name}"
        for tones, variant in (e.get("skin_variations") or {}).items():
            if variant.get(f"has_img_{which}"):
                out[variant["image"]] = f"{which} emoji: {name}, " + " and ".join(TONES.get(t, t) for t in tones.split("-"))
    return out


def lay_out_folder(which: str, folder: Path, side: int, limit: int | None) -> int:
    """Write img/<name>.png and img/<name>.txt from the npm package; returns the number of pictures."""
    (folder / "img").mkdir(parents=True)
    with tarfile.open(npm_pack(f"emoji-datasource-{which}@16.0.0")) as tar:
        emoji = json.load(tar.extractfile("package/emoji.json"))
        captions = captioned_images(emoji, which)
        members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.name.startswith(f"package/img/{which}/64/")}
        n = 0
        for image, caption in sorted(captions.items())[:limit]:
            if image not in members:
                continue
            data = tar.extractfile(members[image]).read()
            if side != 64:
                buffer = io.BytesIO()
                Image.open(io.BytesIO(data)).resize((side, side), Image.LANCZOS).save(buffer, format="PNG")
                data = buffer.getvalue()
            (folder / "img" / image).write_bytes(data)
            (folder / "img" / image).with_suffix(".txt").write_text(caption)
            n += 1
    return n


def print_stage(stats: dict) -> None:
    """One stage's rows in, out and per reason, and its counters other than download's statuses."""
    print(f"{stats['stage']:<8} rows in {stats['rows_in']:>6}  out {stats['rows_out']:>6}  rejected {stats['rows_rejected']:>6}")
    for reason, n in stats["reasons"].items():
        print(f"           {reason:<30}{n:>6}")
    for name, counts in stats["counters"].items():
        if name in ("lang_kept", "lang_rejected", "logs", "status"):
            print(f"           {name}: " + ", ".join(f"{k} {v}" for k, v in list(counts.items())[:10]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=["google", "apple"], default="google")
    parser.add_argument("--side", type=int, default=256, help="pixels per side of the laid-out pictures (the package's are 64)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many pictures (default: all)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="real-folder-"))
    try:
        n = lay_out_folder(args.set, work / "folder", args.side, args.limit)
        print(f"folder: {n} {args.set} emoji PNGs at {args.side} px with their names as captions, e.g. "
              f"{min((work / 'folder' / 'img').glob('*.txt')).read_text()!r}")
        with dask_client(ClusterConfig(workers=2), quiet=True) as client:
            ingest([str(work / "folder")], str(work / "ingest"), IngestConfig(), client)
            download(str(work / "ingest"), str(work / "download"), DownloadConfig(), client)
            cleaned = clean(str(work / "download"), str(work / "clean"), CleanConfig(), client)
            filtered = filter(str(work / "clean"), str(work / "filter"), FilterConfig(clip=False), client)
            previous = filter(str(work / "clean"), str(work / "filter-previous"),
                                    FilterConfig(clip=False, min_lang_score=0.0, min_lang_letters=0), client)
        print("--- funnel")
        for stage in ("ingest", "download", "clean", "filter"):
            print_stage(json.loads((work / stage / "_stats.json").read_text()))
        print("--- filter with the previous language rule (--min-lang-score 0 --min-lang-letters 0)")
        print_stage(previous)
        near = cleaned["reasons"].get("near_duplicate_image", 0)
        share = filtered["rows_out"] / cleaned["rows_in"]
        before = previous["rows_out"] / cleaned["rows_in"]
        print(f"kept through clean + filter: {filtered['rows_out']}/{cleaned['rows_in']} = {share:.4f} "
              f"(previous language rule: {before:.4f}); with clean's {near} near_duplicate_image rejects counted as kept: "
              f"{(filtered['rows_out'] + near) / cleaned['rows_in']:.4f}")
        print(f"ratio={share / before if before else float('nan'):.3f}")  # nan: neither rule kept a row (at 64 px, min_side)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
