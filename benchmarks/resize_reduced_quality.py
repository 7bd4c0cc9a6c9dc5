"""How far the resizer's reduced-scale JPEG decode is from a full decode, against the loss of a quality-95 JPEG re-encode.

The peer is the bound the issue set: the PSNR of the full-decode output against that output
re-encoded as JPEG at quality 95 and decoded (the loss the resizer's default encoder adds to
every image anyway). dallekit's side is the PSNR of the resizer's reduced-decode output
(`Resizer.decode_for_target` + `resize`, before encoding) against the full-decode output of
the same bytes. "as exact" is the mapping before issue 28 (the reduced image resized as if it
covered exactly side / factor pixels), for comparison.

Seeded random sizes (sources 2x to 11x the output side, so each decodes at 1/2, 1/4 or 1/8
and most sides are not multiples of it), random EXIF orientations, the four resize modes.
Images: `photo_like` in colour (the project's photo-like JPEG, quality 90) and with hard
edges between smooth areas (decay 0.4, grain 0.5, 10 shapes); grayscale versions are
reported on their own line: with no chroma subsampling to lose, their quality-95 bound is
7 to 10 dB stricter. This is a quality measurement, not a timing, so nothing alternates in
rounds. Last line: ratio=<min over colour cases of PSNR reduced / PSNR q95> (target >= 1).

    python benchmarks/resize_reduced_quality.py [--sizes 60] [--image-size 64 128]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics

import cv2
import numpy as np
from PIL import Image

from dallekit.config import DownloadConfig
from dallekit.demo.synthetic import photo_like
from dallekit.resize import Resizer, decode, read_header

MODES = ["center_crop", "keep_ratio", "keep_ratio_largest", "border"]
IMAGE_SETS = {"photo": {}, "photo+edges": {"decay": 0.4, "grain": 0.5, "edges": 10}}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB (99 for identical ones)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else float(10 * np.log10(255**2 / mse))


def q95_psnr(img: np.ndarray) -> float:
    """PSNR of pixels against their own JPEG re-encode at quality 95."""
    ok, encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return psnr(img, cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED))


def as_exact(resizer: Resizer, data: bytes) -> np.ndarray:
    """The reduced decode resized as before issue 28: its rounded-up sides taken as exactly side / factor."""
    header = read_header(data)
    factor = resizer.reduction(header)
    img = decode(data, header.orientation, (header.jpeg_mode, factor))
    width, height = (header.width, header.height) if header.orientation < 5 else (header.height, header.width)
    new_width, new_height = resizer.scaled_size(width, height)
    if (new_height, new_width) != img.shape[:2]:
        img = cv2.resize(img, (new_width, new_height), interpolation=cv2.INTER_AREA)
    return resizer.resize(img, (width, height))


def measure_case(data: bytes, image_size: int) -> dict[str, tuple[float, float, float]] | None:
    """Per mode: (PSNR reduced vs full, PSNR as-exact vs full, PSNR of the q95 re-encode) for one JPEG; None when it decodes in full."""
    header = read_header(data)
    full_decode = decode(data, header.orientation)
    results = {}
    for mode in MODES:
        resizer = Resizer(DownloadConfig(image_size=image_size, resize_mode=mode))
        if resizer.reduction(header) == 1:  # a gray JPEG keeps a margin over the target: decoded in full, nothing to compare
            return None
        img, width, height = resizer.decode_for_target(data, header)
        reduced, full = resizer.resize(img, (width, height)), resizer.resize(full_decode)
        results[mode] = (psnr(reduced, full), psnr(as_exact(resizer, data), full), q95_psnr(full))
    return results


def photo_jpeg(seed: int, size: tuple[int, int], orientation: int, gray: bool, options: dict) -> bytes:
    """A seeded photo-like JPEG (quality 90) with an EXIF orientation."""
    image = photo_like(seed, size, **options)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    (image.convert("L") if gray else image).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, default=60, help="random sizes per output size and image set")
    parser.add_argument("--image-size", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; OpenCV {cv2.__version__}")
    print(f"{'image set':<26}{'mode':<20}{'cases':>6}{'reduced min/med':>17}{'as exact min/med':>18}{'q95 min/med':>13}"
          f"{'min ratio':>10}{'below q95':>10}")
    all_ratios = []
    for image_size in args.image_size:
        for name, options in IMAGE_SETS.items():
            for gray in (False, True):
                rng = np.random.default_rng(image_size)
                per_mode: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in MODES}
                full_decodes = 0
                for case in range(args.sizes):
                    size = tuple(int(side) for side in rng.integers(2 * image_size + 2, 11 * image_size, 2))
                    data = photo_jpeg(case, size, int(rng.choice([1, 3, 6, 8])), gray, options)
                    measured = measure_case(data, image_size)
                    full_decodes += measured is None
                    for mode, row in (measured or {}).items():
                        per_mode[mode].append(row)
                label = f"{name}{' gray' if gray else ''}, {image_size} px"
                if full_decodes:
                    print(f"{label:<26}{'(decoded in full)':<20}{full_decodes:>6}")
                for mode, rows in per_mode.items():
                    reduced, exact, q95 = (np.array(column) for column in zip(*rows))
                    ratios = reduced / q95
                    all_ratios.extend(ratios)
                    print(f"{label:<26}{mode:<20}{len(rows):>6}{reduced.min():>9.1f}/{statistics.median(reduced):<7.1f}"
                          f"{exact.min():>10.1f}/{statistics.median(exact):<7.1f}{q95.min():>6.1f}/{statistics.median(q95):<6.1f}"
                          f"{ratios.min():>10.3f}{int((ratios < 1).sum()):>10}")
    print(f"ratio={min(all_ratios):.3f}")


if __name__ == "__main__":
    main()
