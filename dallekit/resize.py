"""resize: dallekit's decoder and resizer, a drop-in for img2dataset's `Resizer` handed to its `Downloader`.

Same call and results as img2dataset's Resizer for ordinary 8-bit images: OpenCV decodes
(`cv2.imdecode`, IMREAD_UNCHANGED), alpha is matted on white, grayscale stays one channel,
CMYK is converted by OpenCV, the resize modes no / keep_ratio / keep_ratio_largest /
center_crop / border resize with INTER_AREA down and INTER_LANCZOS4 up exactly as its
albumentations transforms do, and the encoder and quality are the same. The differences:

- The header is read first (PIL's `Image.open` is lazy: it parses the header and decodes no
  pixel), and the size checks run on it, in img2dataset's order: "image too small", then
  "image_too_large: WxH pixels (N) is more than max_image_area M", then "aspect ratio too
  large". A decompression bomb (a small file that decodes to gigabytes) costs no memory.
  PIL refuses more than 2 x Image.MAX_IMAGE_PIXELS (~179 Mpx) by itself; that refusal is
  reported as image_too_large too. Bytes PIL can not identify are "Image decoding error",
  since their size can not be known before decoding (OpenCV-only formats such as Radiance
  HDR are lost; the web's JPEG, PNG, WebP, GIF, BMP and TIFF are all read by both).
- 16-bit images (PNG "I;16", 48- and 64-bit RGB(A)) are scaled to 8 bits (v / 257, rounded)
  instead of saturating to white; float images are taken as 0..1.
- EXIF orientation is applied, as a viewer shows the image (OpenCV's IMREAD_UNCHANGED ignores
  it). The choice: `original_width`/`original_height` are the displayed, rotated size, so a
  phone photo taken upright reads as portrait everywhere downstream (min_side, aspect rules).
- Alpha is matted in row blocks with img2dataset's arithmetic: the same pixels without its
  whole-image float64 copies, so a decode holds one image of at most max_image_area pixels
  (and its 8-bit or rotated copy while converting).
- A JPEG larger than the target is decoded at reduced scale in the DCT domain (1/2, 1/4 or
  1/8: libjpeg's scaled IDCT), the largest reduction whose shorter side still covers
  `image_size`, then resized with INTER_AREA. A 2048x1536 photo decodes at 512x384 for a 256 px
  output, for a fraction of the cost. libjpeg rounds reduced sides up (a 1001 px side decodes
  to 126 px at 1/8, the last pixel averaging one source column and the encoder's padding), so
  the resize maps the full size, not the reduced one, onto the output (`resize_reduced`) and
  does so before the EXIF rotation, while the padding is still right and bottom: the result
  registers with a full decode at any size and differs from it by less than a quality-95 JPEG
  re-encode does on colour photos (tests/test_resize_reduced.py,
  benchmarks/resize_reduced_quality.py). `original_width` and
  `original_height` come from the header, so they are the full size either way. PNG, WebP,
  GIF and the rest decode in full.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import threading
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from dallekit.config import DownloadConfig
from dallekit.images import ORIENTATION_TAG, jpeg_reduction, resize_reduced, show_upright

MATTE_BLOCK_PIXELS = 1 << 20  # pixels matted at once: float64 temporaries of ~24 MB
_ENCODE_FLAGS = {"jpg": cv2.IMWRITE_JPEG_QUALITY, "png": cv2.IMWRITE_PNG_COMPRESSION, "webp": cv2.IMWRITE_WEBP_QUALITY}


def _failure(message: str) -> tuple:
    return None, None, None, None, None, message


class _Quiet:
    """Who silences fds 1 and 2 in this process: the first decode in redirects them, the last out restores."""

    lock = threading.Lock()
    users = 0
    saved: tuple[int, ...] = ()


@contextlib.contextmanager
def quiet_native_output():
    """Silence fds 1 and 2 while OpenCV decodes: libjpeg and libpng print warnings there (img2dataset does the same)."""
    with _Quiet.lock:
        if not _Quiet.users:
            null = os.open(os.devnull, os.O_WRONLY)
            _Quiet.saved = (os.dup(1), os.dup(2))
            os.dup2(null, 1)
            os.dup2(null, 2)
            os.close(null)
        _Quiet.users += 1
    try:
        yield
    finally:
        with _Quiet.lock:
            _Quiet.users -= 1
            if not _Quiet.users:
                for fd, saved in zip((1, 2), _Quiet.saved):
                    os.dup2(saved, fd)
                    os.close(saved)


class Header(NamedTuple):
    """What an image's header says: stored size, EXIF orientation, and whether a DCT-domain reduced decode applies."""

    width: int
    height: int
    orientation: int
    jpeg_mode: str | None  # "L" or "RGB" (OpenCV's reduced decode flag family) for 8-bit JPEGs, None for anything else


_REDUCED_FLAGS = {  # the reduced decodes, told not to apply EXIF orientation: decode() applies it itself
    ("RGB", 2): cv2.IMREAD_REDUCED_COLOR_2, ("RGB", 4): cv2.IMREAD_REDUCED_COLOR_4, ("RGB", 8): cv2.IMREAD_REDUCED_COLOR_8,
    ("L", 2): cv2.IMREAD_REDUCED_GRAYSCALE_2, ("L", 4): cv2.IMREAD_REDUCED_GRAYSCALE_4, ("L", 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def read_header(data: bytes) -> Header:
    """The image's Header from its bytes' header alone; raises on bytes PIL can not identify."""
    with Image.open(io.BytesIO(data)) as image:
        orientation = 1
        # only EXIF already parsed from the header: PNG's getexif() would decode the image to look for a late eXIf chunk
        if "exif" in image.info or image.format == "TIFF":
            try:
                orientation = int(image.getexif().get(ORIENTATION_TAG, 1))
            except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to lose the image
                orientation = 1
        jpeg_mode = None
        if image.format == "JPEG" and image.mode in ("L", "RGB", "CMYK"):  # OpenCV decodes CMYK JPEGs to BGR in full too
            jpeg_mode = "L" if image.mode == "L" else "RGB"
        return Header(image.width, image.height, orientation if 1 <= orientation <= 8 else 1, jpeg_mode)


def to_8bit(img: np.ndarray) -> np.ndarray:
    """8-bit pixels: 16-bit scaled by 1/257 (rounded), float taken as 0..1; OpenCV's other depths are refused."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return cv2.convertScaleAbs(img, alpha=1 / 257)
    if img.dtype in (np.float32, np.float64):
        return cv2.convertScaleAbs(img, alpha=255)
    raise ValueError(f"unsupported pixel type {img.dtype}")


def matte_on_white(img: np.ndarray) -> np.ndarray:
    """BGRA -> BGR on a white background, img2dataset's formula in row blocks (no whole-image float64 copies)."""
    out = np.empty(img.shape[:2] + (3,), np.uint8)
    rows = max(1, MATTE_BLOCK_PIXELS // img.shape[1])
    for top in range(0, img.shape[0], rows):
        block = img[top : top + rows]
        alpha = block[:, :, 3, np.newaxis]
        out[top : top + rows] = np.rint((alpha / 255 * block[..., :3] + 255 - alpha).clip(min=0, max=255))
    return out


def decode(data: bytes, orientation: int = 1, reduced: tuple[str, int] | None = None) -> np.ndarray:
    """Decode with OpenCV as img2dataset does (or a JPEG at 1/factor scale, `reduced` = (mode, factor)), then to 8 bits, alpha matted on white, shown upright."""
    flags = _REDUCED_FLAGS[reduced] | cv2.IMREAD_IGNORE_ORIENTATION if reduced else cv2.IMREAD_UNCHANGED
    with quiet_native_output():
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise ValueError("Image decoding error")
    img = to_8bit(img)
    if img.ndim == 3 and img.shape[2] == 4:
        img = matte_on_white(img)
    return show_upright(img, orientation)


class Resizer:
    """img2dataset's Resizer interface, configured from a DownloadConfig; see the module docstring for what differs."""

    def __init__(self, config: DownloadConfig):
        self.image_size = config.image_size
        self.resize_mode = config.resize_mode
        self.resize_only_if_bigger = config.resize_only_if_bigger
        self.min_image_size = config.min_image_size
        self.max_image_area = config.max_image_area
        self.max_aspect_ratio = config.max_aspect_ratio
        self.encode_ext = f".{config.encode_format}"
        self.encode_params = [int(_ENCODE_FLAGS[config.encode_format]), config.quality]

    def __call__(self, img_stream, blurring_bbox_list=None):
        """(img_bytes, width, height, original_width, original_height, error_message), as img2dataset's Resizer."""
        try:
            return self._resize_stream(img_stream, blurring_bbox_list)
        except Exception as err:  # noqa: BLE001 - img2dataset records any failure as the row's error
            return _failure(str(err))

    def _resize_stream(self, img_stream, blurring_bbox_list) -> tuple:
        cv2.setNumThreads(1)  # the download threads and the Dask workers already use the cores
        img_stream.seek(0)
        data = img_stream.read()
        try:
            header = read_header(data)
        except Image.DecompressionBombError as err:
            return _failure(self._bomb_message(err))
        except Exception:  # noqa: BLE001 - not an image PIL knows: its size can not be checked before decoding
            return _failure("Image decoding error")
        refusal = self.check_size(header.width, header.height)
        if refusal:
            return _failure(refusal)
        if blurring_bbox_list is not None:
            return _failure("blurrer not defined")
        img, original_width, original_height = self.decode_for_target(data, header)
        refusal = self.check_size(original_width, original_height)  # the header may have understated it
        if refusal:
            return _failure(refusal)
        img = self.resize(img, (original_width, original_height))
        ok, encoded = cv2.imencode(self.encode_ext, img, params=self.encode_params)
        if not ok:
            return _failure("Image encoding error")
        return encoded.tobytes(), img.shape[1], img.shape[0], original_width, original_height, None

    def reduction(self, header: Header) -> int:
        """The DCT-domain reduction (1, 2, 4 or 8) to decode this image at: the largest whose shorter side still covers image_size.

        One rule for every mode: center_crop and keep_ratio scale the shorter side to image_size,
        border and keep_ratio_largest the longer one, and with both sides covering image_size
        the final resize still only shrinks, from at least as many pixels as it writes.
        """
        if header.jpeg_mode is None or self.scaled_size(header.width, header.height) is None:
            return 1
        # a gray JPEG loses no chroma to its re-encode, so the bar is higher: keep half again the target
        margin = 1.5 if header.jpeg_mode == "L" else 1.0
        return jpeg_reduction(header.width, header.height, min_side=math.ceil(self.image_size * margin))

    def decode_for_target(self, data: bytes, header: Header) -> tuple[np.ndarray, int, int]:
        """(pixels shown upright, original width, original height): decoded at the reduction the target allows, and then already scaled."""
        factor = self.reduction(header)
        if factor > 1:
            img = decode(data, 1, (header.jpeg_mode, factor))  # as stored: the partial edge blocks are right and bottom
            if img.shape[:2] == (-(-header.height // factor), -(-header.width // factor)):  # libjpeg rounds reduced sides up
                upright = (header.width, header.height) if header.orientation < 5 else (header.height, header.width)
                target = self.scaled_size(*upright)
                stored_target = target if header.orientation < 5 else target[::-1]
                img = resize_reduced(img, factor, (header.width, header.height), stored_target)
                return show_upright(img, header.orientation), upright[0], upright[1]
            # the header and the decoder disagree on the size: trust only a full decode
        img = decode(data, header.orientation)
        return img, img.shape[1], img.shape[0]

    def check_size(self, width: int, height: int) -> str | None:
        """img2dataset's size refusals, in its order, with the area one naming size and limit; None when fine."""
        if min(width, height) < self.min_image_size:
            return "image too small"
        if width * height > self.max_image_area:
            return f"image_too_large: {width}x{height} pixels ({width * height}) is more than max_image_area {self.max_image_area:.0f}"
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            return "aspect ratio too large"
        return None

    def _bomb_message(self, err: Exception) -> str:
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{found.group(1)} pixels" if found else "the image"
        pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        limit = f"max_image_area {self.max_image_area:.0f}" if self.max_image_area < pil_limit else f"PIL's decompression-bomb limit {pil_limit}"
        return f"image_too_large: {size} is more than {limit}"

    def _fitted_side(self, width: int, height: int) -> int:
        """The side the mode scales to image_size: the shorter for keep_ratio and center_crop, the longer for the others."""
        return min(height, width) if self.resize_mode in ("keep_ratio", "center_crop") else max(height, width)

    def scaled_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The (width, height) a width x height image is resized to before cropping or padding; None when it is not resized."""
        if self.resize_mode == "no":
            return None
        side = self._fitted_side(width, height)
        if self.resize_only_if_bigger and side <= self.image_size:
            return None
        scale = self.image_size / side
        return max(1, round(width * scale)), max(1, round(height * scale))

    def resize(self, img: np.ndarray, original: tuple[int, int] | None = None) -> np.ndarray:
        """Resize, crop or pad as img2dataset's albumentations transforms do (same sizes, rounding and interpolation).

        `original` is the (width, height) of an image decoded at reduced scale: the output size
        is computed from it, so that it is the size a full decode gives (decode_for_target has
        then already scaled it, and only the crop or padding is left).
        """
        width, height = original or (img.shape[1], img.shape[0])
        scaled = self.scaled_size(width, height)
        if scaled is None:
            return img
        new_width, new_height = scaled
        if (new_height, new_width) != img.shape[:2]:
            downscale = self._fitted_side(width, height) > self.image_size
            img = cv2.resize(img, (new_width, new_height), interpolation=cv2.INTER_AREA if downscale else cv2.INTER_LANCZOS4)
        size = self.image_size
        if self.resize_mode == "center_crop":
            top, left = (new_height - size) // 2, (new_width - size) // 2
            return img[top : top + size, left : left + size]
        if self.resize_mode == "border":
            top, left = int(max(0, size - new_height) / 2.0), int(max(0, size - new_width) / 2.0)
            bottom, right = max(0, size - new_height) - top, max(0, size - new_width) - left
            return cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=[255, 255, 255])
        return img
