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
