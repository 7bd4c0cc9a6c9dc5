"""The resizer's reduced-scale JPEG decode: the reduction it picks, and that its output matches a full decode."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from dallekit.config import DownloadConfig
from dallekit.demo.synthetic import photo_like
from dallekit.resize import Resizer, decode, read_header


def jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **save)
    return buffer.getvalue()


def full_decode_output(resizer: Resizer, data: bytes) -> np.ndarray:
    """What the resizer wrote before reduced decoding: full decode, same resize, same encoder, decoded again."""
    header = read_header(data)
    img = resizer.resize(decode(data, header.orientation))
    ok, encoded = cv2.imencode(resizer.encode_ext, img, params=resizer.encode_params)
    assert ok
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("mode", ["center_crop", "keep_ratio", "border", "keep_ratio_largest"])
@pytest.mark.parametrize("width", [640, 1280, 2048])
def test_reduced_decode_matches_full_decode_within_jpeg_reencoding(width, mode):
    data = jpeg(photo_like(width, (width, width * 3 // 4)))
    resizer = Resizer(DownloadConfig(image_size=256, resize_mode=mode))
    out, w, h, original_w, original_h, error = resizer(io.BytesIO(data))
    assert error is None and (original_w, original_h) == (width, width * 3 // 4)  # from the header, not the reduced decode
    reduced = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    full = full_decode_output(resizer, data)
    assert reduced.shape == full.shape == (h, w, 3)
    assert psnr(reduced, full) >= 38, (width, mode, psnr(reduced, full))


def test_reduction_is_the_largest_that_still_covers_the_target():
    def factor(width, height, fmt="JPEG", **options):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), "gray").save(buffer, format=fmt)
        return Resizer(DownloadConfig(**options)).reduction(read_header(buffer.getvalue()))

    assert factor(640, 480) == 1  # 480 / 2 < 256
    assert factor(1280, 960) == 2 and factor(960, 1280) == 2
    assert factor(2048, 1536) == 4 and factor(2048, 2048) == 8
    assert factor(2048, 1536, resize_mode="border") == 4  # both sides cover the target in every mode
    assert factor(2048, 1536, image_size=512) == 2 and factor(2048, 1536, image_size=1024) == 1
    assert factor(2048, 1536, resize_mode="no") == 1
    assert factor(2048, 1536, fmt="PNG") == 1 and factor(2048, 1536, fmt="WEBP") == 1


def test_a_coarser_reduction_would_fail_the_quality_bar():
    """The PSNR bar above can fail: decoding the 1280 px photo at 1/8 (a 120 px short side) for a 256 px output does."""
    data = jpeg(photo_like(7, (1280, 960)))
    resizer = Resizer(DownloadConfig(image_size=256))
    too_coarse = resizer.resize(decode(data, 1, ("RGB", 8)))
    full = resizer.resize(decode(data, 1))
    assert psnr(too_coarse, full) < 38


def test_reduced_decode_keeps_exif_orientation_grayscale_and_header_sizes():
    photo = photo_like(3, (2048, 1536))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 90 clockwise)
    data = jpeg(photo, exif=exif.tobytes())
    resizer = Resizer(DownloadConfig(image_size=256, resize_mode="keep_ratio"))
    assert resizer.reduction(read_header(data)) == 4
    out, w, h, original_w, original_h, error = resizer(io.BytesIO(data))
    assert error is None and (original_w, original_h) == (1536, 2048) and (w, h) == (256, 341)
    assert psnr(cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED), full_decode_output(resizer, data)) >= 38

    gray = jpeg(photo.convert("L"))
    out, w, h, original_w, original_h, error = resizer(io.BytesIO(gray))
    decoded = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    assert error is None and decoded.ndim == 2 and (original_w, original_h) == (2048, 1536)  # one channel, as a full decode gives
    assert psnr(decoded, full_decode_output(resizer, gray)) >= 38


MODES = ["center_crop", "keep_ratio", "keep_ratio_largest", "border"]


def reduced_and_full(resizer: Resizer, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The resizer's pixels before encoding, from its reduced decode and from a full decode of the same bytes."""
    header = read_header(data)
    img, width, height = resizer.decode_for_target(data, header)
    return resizer.resize(img, (width, height)), resizer.resize(decode(data, header.orientation))


def q95_psnr(img: np.ndarray) -> float:
    """PSNR of pixels against their own JPEG re-encode at quality 95: the loss the resizer's default encoder adds anyway."""
    ok, encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return psnr(img, cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED))


def test_reduced_decode_is_within_q95_reencoding_for_sizes_not_multiples_of_the_reduction():
    """50 seeded photo sizes from 130 to 700 px (mostly not multiples of the 2, 4 or 8 they reduce by), 64 px output, 4 modes, EXIF orientations.

    libjpeg's reduced sides are rounded up; a resize that took them as exact stretched the image by
    up to 7 source pixels and fell below a quality-95 re-encode on some of these sizes.
    """
    rng = np.random.default_rng(28)
    reduced_cases = 0
    for case in range(50):
        width, height = (int(side) for side in rng.integers(130, 701, 2))
        exif = Image.Exif()
        exif[0x0112] = int(rng.choice([1, 3, 6, 8]))
        data = jpeg(photo_like(case, (width, height), decay=0.4, grain=0.5, edges=10), exif=exif.tobytes())
        for mode in MODES:
            resizer = Resizer(DownloadConfig(image_size=64, resize_mode=mode))
            reduced_cases += resizer.reduction(read_header(data)) > 1
            reduced, full = reduced_and_full(resizer, data)
            assert reduced.shape == full.shape
            assert psnr(reduced, full) >= q95_psnr(full), (width, height, exif[0x0112], mode, psnr(reduced, full), q95_psnr(full))
    assert reduced_cases == 4 * 50  # every size here is decoded at a reduced scale


def edge_column(img: np.ndarray) -> float:
    """Where a vertical edge is, in output pixels from the left: the centroid of the column profile's steps (blurring does not move it)."""
    steps = np.abs(np.diff(img.reshape(img.shape[0], img.shape[1], -1).mean(axis=(0, 2))))
    return float((np.arange(1, len(steps) + 1) * steps).sum() / steps.sum())


@pytest.mark.parametrize("orientation", [1, 3, 6])
def test_reduced_decode_puts_an_edge_where_a_full_decode_does(orientation):
    """A vertical edge near the far side lands within 0.05 output px of the full decode's edge, for 30 seeded sizes not multiples of 8."""
    rng = np.random.default_rng(orientation)
    for _ in range(30):
        width, height = (int(side) for side in rng.integers(130, 701, 2))
        width += width % 8 == 0  # not a multiple of the reduction
        upright_width = width if orientation < 5 else height
        stored = np.full((height, width), 40, np.uint8)
        if orientation < 5:
            stored[:, int(upright_width * (0.2 if orientation == 3 else 0.8)) :] = 220  # shown at 80% of the width
        else:  # rotated 90 degrees clockwise: the shown columns are the stored rows from the bottom
            stored[: height - int(upright_width * 0.8), :] = 220
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = jpeg(Image.fromarray(np.stack([stored] * 3, axis=-1)), exif=exif.tobytes())  # colour: a gray JPEG keeps a margin
        resizer = Resizer(DownloadConfig(image_size=64, resize_mode="keep_ratio_largest"))
        assert resizer.reduction(read_header(data)) > 1
        reduced, full = reduced_and_full(resizer, data)
        assert abs(edge_column(reduced) - edge_column(full)) <= 0.05, (width, height)


def test_a_gray_jpeg_is_reduced_only_with_half_again_the_target():
    """A gray JPEG's q95 re-encode keeps 7-10 dB more than a colour one's, so its reduced decode needs a margin to stay above it."""
    resizer = Resizer(DownloadConfig(image_size=64, resize_mode="center_crop"))
    for mode, expected in (("L", 1), ("RGB", 2)):  # a 149 px short side: 75 px at 1/2 covers 64, but not 96
        image = Image.new(mode, (149, 212), 128)
        assert resizer.reduction(read_header(jpeg(image))) == expected, mode
