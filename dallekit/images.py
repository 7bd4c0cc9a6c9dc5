"""Image bytes -> pixels and perceptual hashes, shared by the stages that look at images."""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image

ORIENTATION_TAG = 0x0112  # EXIF
HASH_SIDE = 32  # pHash works on a 32x32 grayscale image and keeps the 8x8 lowest DCT frequencies


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix, so that D @ x @ D.T is the 2-D DCT of x."""
    k = np.arange(n)
    d = np.sqrt(2 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    d[0] /= np.sqrt(2)
    return d


_DCT8 = _dct_matrix(HASH_SIDE)[:8]  # (8, 32): only the lowest frequencies are needed


class UndecodableImage(ValueError):
    """The bytes are not a complete image."""


class ImageTooLarge(UndecodableImage):
    """The image's header gives it more pixels than a stage decodes."""


MAX_DECODE_PIXELS = 64_000_000  # download's default max_image_area: no stage decodes more than download would keep


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header alone, no pixel decoded; raises UndecodableImage (ImageTooLarge for PIL's bomb limit)."""
    if data is None:
        raise UndecodableImage("no image bytes")
    size = jpeg_size(data)  # a JPEG's start-of-frame is found without PIL's lazy open
    if size and min(size) > 0:
        return size
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Image.DecompressionBombError as err:  # PIL refuses over 2 x MAX_IMAGE_PIXELS from the header alone
        raise ImageTooLarge(f"image_too_large: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UndecodableImage(f"not an image PIL can identify: {err}") from None


def check_decode_size(data: bytes, max_pixels: float = MAX_DECODE_PIXELS) -> tuple[int, int]:
    """The header's (width, height) when it is at most `max_pixels`, before any decode; raises ImageTooLarge or UndecodableImage."""
    width, height = header_size(data)
    if width * height > max_pixels:
        raise ImageTooLarge(f"image_too_large: {width}x{height} pixels ({width * height}) is more than {max_pixels:.0f}")
    return width, height


def undecodable_reason(err: UndecodableImage) -> str:
    """The reason a stage gives for an image it did not decode: image_too_large (by its header) or undecodable."""
    return "image_too_large" if isinstance(err, ImageTooLarge) else "undecodable"


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to RGB once the header allows it; JPEGs decode at reduced scale when `draft_size` allows.

    Raises ImageTooLarge (more than MAX_DECODE_PIXELS by the header: nothing decoded) or
    UndecodableImage (no readable header, or bad pixel data).
    """
    check_decode_size(data)
    try:
        image = Image.open(io.BytesIO(data))
        if draft_size:
            image.draft("RGB", (draft_size, draft_size))
        if image.mode in ("RGBA", "LA", "P"):  # composite transparency on white, as img2dataset does
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UndecodableImage(str(err)) from None


MIN_HASH_SOURCE = 2 * HASH_SIDE  # decode at least twice the pHash input, so the 32x32 image is an average, not a sample
THUMB_SIDE = 8  # the colour signature: an 8x8 RGB thumbnail, 192 bytes
THUMB_BYTES = THUMB_SIDE * THUMB_SIDE * 3
DETAIL_SIDE = 32  # the detail signature: a 32x32 RGB thumbnail, 3072 bytes, compared at DETAIL_COMPARE after alignment
DETAIL_BYTES = DETAIL_SIDE * DETAIL_SIDE * 3
DETAIL_COMPARE = 16
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame; C4/C8/CC are DHT, JPG and DAC
_COLOR_FLAGS = {1: "IMREAD_COLOR", 2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, or None when the bytes are not a JPEG or it is not found.

    Walks the marker segments by their lengths (a few steps, no decoding): far cheaper than PIL's lazy open.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _SOF_MARKERS:
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def jpeg_reduction(width: int, height: int, min_side: int = MIN_HASH_SOURCE) -> int:
    """The largest JPEG DCT-domain reduction (8, 4, 2 or 1) whose reduced shorter side is still >= `min_side`."""
    short = min(width, height)
    for factor in (8, 4, 2):
        if -(-short // factor) >= min_side:  # libjpeg rounds reduced sides up
            return factor
    return 1


def _jpeg_size_checked(data: bytes) -> tuple[int, int] | None:
    """The JPEG's (width, height), (0, 0) when its header has none, None for other formats; raises for truncated JPEGs."""
    if data is None:
        raise UndecodableImage("no image bytes")
    if data[:2] != b"\xff\xd8":
        return None
    if b"\xff\xd9" not in data[-64:]:  # OpenCV fills a truncated JPEG with gray instead of failing
        raise UndecodableImage("truncated JPEG (no end-of-image marker)")
    return jpeg_size(data) or (0, 0)


def show_upright(img: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels as a viewer shows them for an EXIF orientation (PIL's exif_transpose, in OpenCV); 1 or unknown: as stored."""
    import cv2

    if orientation in (5, 6, 7, 8):  # a quarter turn: transposed, then flipped
        img = cv2.transpose(img)
    flip = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}.get(orientation)  # 1: about the vertical axis, 0: the horizontal, -1: both
    return img if flip is None else cv2.flip(img, flip)


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) in a JPEG's header, 1 when it has none or a broken one; no pixel is decoded."""
    if b"Exif" not in data[:65536]:
        return 1
    try:
        with Image.open(io.BytesIO(data)) as image:
            orientation = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block: shown as stored
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def resize_reduced(img: np.ndarray, factor: int, stored_size: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """Area-resize a 1/factor decode of a (width, height) JPEG, as stored, to `target` (width, height) in register with a full decode.

    libjpeg rounds reduced sides up: when a side is not a multiple of the factor, its last
    reduced pixel averages the partial edge block with the encoder's padding, so the reduced
    image spans ceil(side / factor) * factor source pixels, not side. The scale is therefore
    taken from the full size (source pixel x sits at x / factor) and the output that falls
    past the image's edge is cropped off; the padding is on the right and bottom as stored.
    """
    import cv2

    (width, height), (new_width, new_height) = stored_size, target
    scaled = cv2.resize(img, None, fx=new_width * factor / width, fy=new_height * factor / height, interpolation=cv2.INTER_AREA)
    return scaled[:new_height, :new_width]  # ceil(side / factor) >= side / factor: the scaled image covers the target


def decode_reduced(data: bytes) -> np.ndarray:
    """BGR pixels (H, W, 3) of image bytes, JPEGs reduced in the DCT domain to a shorter side of no less than 64; raises UndecodableImage.

    A fixed 1/8 reduction left 8x8 pixels of a 64 px image, too few to tell pictures apart, so
    the reduction follows the size in the header. Non-JPEGs decode in full. Nothing decodes
    before the header's size is checked (ImageTooLarge above MAX_DECODE_PIXELS): a JPEG's
    reduced decode still reads every coefficient, and a PNG's decodes in full. A reduced
    decode keeps its rounded-up size but is resampled to register with the full image (its
    last pixel covered a partial block), then turned upright as OpenCV's full decode would be.
    """
    import cv2

    width, height = check_decode_size(data)
    size = _jpeg_size_checked(data)
    factor = jpeg_reduction(width, height) if size and min(size) > 0 else 1
    flags = getattr(cv2, _COLOR_FLAGS[factor]) | (cv2.IMREAD_IGNORE_ORIENTATION if factor > 1 else 0)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if pixels is None or pixels.size == 0:
        raise UndecodableImage("not a decodable image")
    if factor == 1:
        return pixels  # OpenCV applied the EXIF orientation
    rows, columns = pixels.shape[:2]
    if (rows, columns) == (-(-height // factor), -(-width // factor)):  # libjpeg rounds reduced sides up: register with the full image
        pixels = resize_reduced(pixels, factor, (width, height), (columns, rows))
    return show_upright(pixels, jpeg_orientation(data))


def _area_resize(pixels: np.ndarray, side: int) -> np.ndarray:
    import cv2

    if pixels.shape[:2] == (side, side):
        return pixels
    return cv2.resize(pixels, (side, side), interpolation=cv2.INTER_AREA)


def phash_of_gray(gray: np.ndarray) -> int:
    """64-bit pHash (imagehash's algorithm) of grayscale pixels: DCT of the 32x32 image, 8x8 lowest frequencies vs their median."""
    pixels = _area_resize(gray, HASH_SIDE).astype(np.float64)  # (32, 32)
    low = (_DCT8 @ pixels @ _DCT8.T).ravel()  # (64,) the 8x8 lowest frequencies of the 2-D DCT
    ordered = np.sort(low)
    bits = low > (ordered[31] + ordered[32]) / 2  # above the median
    return int(np.packbits(bits).view(">u8")[0])


def phash(data: bytes) -> int:
    """64-bit perceptual hash (imagehash's pHash algorithm) of image bytes, as clean stores it; raises UndecodableImage."""
    return image_signature(data).phash


class Signature(NamedTuple):
    """What the near-duplicate rule compares: pHash, 8x8 colour thumbnail, 32x32 detail thumbnail (RGB bytes)."""

    phash: int
    color_thumb: bytes
    detail_thumb: bytes


def image_signature(data: bytes) -> Signature:
    """The Signature of image bytes from one colour decode (JPEGs DCT-reduced); raises UndecodableImage.

    pHash is grayscale and blind to colour, so a pHash match is confirmed with `color_distance`
    of the 8x8 thumbnails, then with `detail_distance` of the 32x32 ones (a flag's emblem, a
    face, a skin tone: details an 8x8 average loses). The hash's gray is the decoded RGB's
    luma, as imagehash's PIL convert("L") computes it.
    """
    import cv2

    bgr = decode_reduced(data)
    detail = _area_resize(bgr, DETAIL_SIDE)
    thumb = np.ascontiguousarray(_area_resize(detail, THUMB_SIDE)[:, :, ::-1])  # BGR -> RGB; 32 -> 8 is an exact 4x4 mean
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    return Signature(phash_of_gray(gray), thumb.tobytes(), np.ascontiguousarray(detail[:, :, ::-1]).tobytes())


def signature_columns(images: list[bytes | None], failures: list | None = None) -> dict[str, pa.Array]:
    """phash, color_thumb and detail_thumb columns of image bytes (null for a missing or undecodable image).

    `failures`, when given, gets each row's reason for a null signature (`undecodable_reason`), or None.
    """
    hashes, thumbs, details = [], [], []
    for data in images:
        why = None
        try:
            sig = image_signature(data) if data is not None else None
        except UndecodableImage as err:  # the header is read first: an image over MAX_DECODE_PIXELS is never decoded
            sig, why = None, undecodable_reason(err)
        if failures is not None:
            failures.append(why)
        hashes.append(sig.phash if sig else None)
        thumbs.append(sig.color_thumb if sig else None)
        details.append(sig.detail_thumb if sig else None)
    return {"phash": pa.array(hashes, pa.uint64()), "color_thumb": pa.array(thumbs, pa.binary(THUMB_BYTES)),
            "detail_thumb": pa.array(details, pa.binary(DETAIL_BYTES))}


def thumbs_array(thumbs: list[bytes]) -> np.ndarray:
    """Colour thumbnails (bytes of THUMB_BYTES each) as a (n, 192) uint8 array."""
    if not thumbs:
        return np.zeros((0, THUMB_BYTES), np.uint8)
    return np.frombuffer(b"".join(thumbs), np.uint8).reshape(len(thumbs), THUMB_BYTES)


def color_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference per channel value (0-255) between thumbnails a[i] and b[i], for (n, 192) uint8 arrays of pairs.

    Vectorised over the pairs, so a distributed dedup can check every candidate pair at once;
    a (192,) array broadcasts against many.
    """
    a = np.asarray(a, np.uint8).reshape(-1, THUMB_BYTES)
    b = np.asarray(b, np.uint8).reshape(-1, THUMB_BYTES)
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=1)


def _warp_matrix(scale: float, shift: float, fine: int = 8) -> np.ndarray:
    """(16, 32): 1-D resampling of a 32-pixel axis to 16, the content scaled by `scale` and moved by `shift` (fractions of the side).

    Each output pixel averages `fine` linear-interpolated samples across its width: an area
    resize that can move by fractions of a pixel.
    """
    out = np.zeros((DETAIL_COMPARE, DETAIL_SIDE))
    u = (np.arange(DETAIL_COMPARE)[:, None] + (np.arange(fine) + 0.5) / fine) / DETAIL_COMPARE  # (16, fine) in [0, 1]
    x = np.clip((0.5 + (u - 0.5) * scale + shift) * DETAIL_SIDE - 0.5, 0, DETAIL_SIDE - 1)
    left = np.floor(x).astype(int)
    right, weight = np.minimum(left + 1, DETAIL_SIDE - 1), x - left
    rows = np.repeat(np.arange(DETAIL_COMPARE), fine)
    np.add.at(out, (rows, left.ravel()), (1 - weight).ravel() / fine)
    np.add.at(out, (rows, right.ravel()), weight.ravel() / fine)
    return out


# the crops and shifts detail_distance forgives: content scaled by up to 4% and moved by up to 3% per axis
_ALIGN = np.stack([_warp_matrix(s, d) for s in (0.96, 0.98, 1.0, 1.02, 1.04) for d in (-0.03, -0.02, -0.01, 0, 0.01, 0.02, 0.03)])
_IDENTITY = _warp_matrix(1.0, 0.0)


def detail_distance(a: np.ndarray, b: np.ndarray, enough: float = -1.0, chunk: int = 4096) -> np.ndarray:
    """The worst block difference between detail thumbnails a[i] and b[i] ((n, 3072) uint8), after aligning b to a.

    Per axis, b's scale and shift (up to 4% and 3%: a slight crop, a resize's rounding) are the
    ones whose luma profile best matches a's; then both are compared at 16x16 and the result is
    the largest mean absolute difference per channel value (0-255) over the 4x4 blocks, or the
    unmoved images' when that is lower. A copy differs a little everywhere; a different picture
    (another emblem, face or skin tone) differs a lot in one place, which a whole-image mean
    dilutes. Pairs whose unmoved difference is at most `enough` skip the alignment (a caller
    that only compares with a limit passes it: most copies are aligned already).
    """
    a = np.asarray(a, np.uint8).reshape(-1, DETAIL_SIDE, DETAIL_SIDE, 3)
    b = np.asarray(b, np.uint8).reshape(-1, DETAIL_SIDE, DETAIL_SIDE, 3)
    out = np.empty(len(a))
    for lo in range(0, len(a), chunk):
        out[lo : lo + chunk] = _detail_chunk(a[lo : lo + chunk].astype(np.float32), b[lo : lo + chunk].astype(np.float32), enough)
    return out


def _detail_chunk(a: np.ndarray, b: np.ndarray, enough: float) -> np.ndarray:
    """detail_distance of one chunk of float32 (n, 32, 32, 3) pairs.

    Batched matrix products and slice sums: numpy's reductions over short or several axes
    were 80% of the time.
    """
    a16 = _unmoved(a)
    out = _worst_block(a16, _unmoved(b))
    # the profiles are averages and may prefer a wrong move by noise alone: the unmoved image competes too
    move = np.flatnonzero(out > enough)
    if len(move):
        out[move] = np.minimum(out[move], _worst_block(a16[move], _aligned(a[move], b[move])))
    return out


def _aligned(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """b resampled to 16x16 with, per axis, the move of _ALIGN whose luma profile best matches a's: (n, 16, 3, 16)."""
    align, ident = _ALIGN.astype(np.float32), _IDENTITY.astype(np.float32)
    luma_a, luma_b = a[..., 0] + a[..., 1] + a[..., 2], b[..., 0] + b[..., 1] + b[..., 2]  # 3x luma: only compared
    picks = []
    for axis in (2, 1):  # rows' profile (sum over columns), then columns'
        target = luma_a.sum(axis=axis) @ ident.T  # (n, 16)
        candidates = np.tensordot(luma_b.sum(axis=axis), align, axes=([1], [2]))  # (n, options, 16)
        picks.append(np.abs(candidates - target[:, None]).sum(axis=2).argmin(axis=1))
    return _resample(b, align[picks[0]], align[picks[1]])


def _worst_block(a16: np.ndarray, b16: np.ndarray) -> np.ndarray:
    """The largest mean absolute difference over the 4x4 blocks of two (n, 16, 3, 16) reductions."""
    n = len(a16)
    diff = np.abs(a16 - b16)
    diff = diff[:, :, 0] + diff[:, :, 1] + diff[:, :, 2]  # (n, 16, 16): rows, columns
    blocks = diff.reshape(n, 16, 4, 4).sum(axis=3).reshape(n, 4, 4, 4).sum(axis=2)  # (n, block row, block column)
    return blocks.reshape(n, -1).max(axis=1) / 48  # 16 pixels x 3 channels a block


def _unmoved(x: np.ndarray) -> np.ndarray:
    """_resample with _IDENTITY on both axes, by slices (its rows are the taps 1/16, 7/16, 7/16, 1/16, edges repeated)."""
    for axis in (1, 2):
        padded = np.concatenate([x.take([0], axis), x, x.take([DETAIL_SIDE - 1], axis)], axis=axis)

        def tap(start: int, padded: np.ndarray = padded, axis: int = axis) -> np.ndarray:
            index = [slice(None)] * padded.ndim
            index[axis] = slice(start, start + DETAIL_SIDE, 2)
            return padded[tuple(index)]

        x = (tap(0) + tap(3) + 7 * (tap(1) + tap(2))) / 16
    return x.transpose(0, 1, 3, 2)  # (n, 16 rows, 3, 16 columns), as _resample's


def _resample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows[i] @ x[i] @ cols[i].T per channel: (n, 32, 32, 3) -> (n, 16, 3, 16) (row, channel, column)."""
    n, side = len(x), DETAIL_SIDE
    tall = np.matmul(rows, x.reshape(n, side, side * 3)).reshape(n, DETAIL_COMPARE, side, 3)  # (n, 16, 32, 3)
    wide = tall.transpose(0, 1, 3, 2).reshape(n, DETAIL_COMPARE * 3, side)
    return np.matmul(wide, cols.transpose(0, 2, 1)).reshape(n, DETAIL_COMPARE, 3, DETAIL_COMPARE)


def load_square(data: bytes, size: int) -> np.ndarray:
    """Decode, resize the shorter side to `size` and centre-crop: (size, size, 3) uint8, as the dVAE expects; raises UndecodableImage (ImageTooLarge before decoding)."""
    image = decode_rgb(data, draft_size=size)
    w, h = image.size
    scale = size / min(w, h)
    resized = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.LANCZOS)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def save_image_grid(images: list[np.ndarray], path, columns: int = 8, min_side: int = 96) -> None:
    """Images (H, W, 3) in rows of `columns` (blank-filled), enlarged by whole factors to at least `min_side` px, as PNG."""
    columns = min(columns, len(images))
    blank = np.zeros_like(images[0])
    rows = [np.concatenate(list(images[i : i + columns]) + [blank] * (columns - len(images[i : i + columns])), axis=1)
            for i in range(0, len(images), columns)]
    grid = np.concatenate(rows, axis=0)
    scale = max(1, min_side // images[0].shape[0])
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(path)


def bytes_grid(images: list[bytes | None], labels: list[str], columns: int = 6, side: int = 128) -> Image.Image:
    """Encoded images (header checked first) in a labelled grid; one that is missing or does not decode is a grey tile."""
    tiles = []
    for data in images:
        try:
            tiles.append(load_square(data, side) if isinstance(data, bytes) and data else np.full((side, side, 3), 128, np.uint8))
        except UndecodableImage:
            tiles.append(np.full((side, side, 3), 128, np.uint8))
    return labelled_grid(tiles, labels, columns=columns, side=side)


def labelled_grid(images: list[np.ndarray], labels: list[str], columns: int = 6, side: int = 128) -> Image.Image:
    """Images enlarged to `side` px (nearest neighbour) in rows of `columns`, each with its label underneath."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    label_h = 28
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (side + 8) + 8, rows * (side + label_h + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = 8 + (i % columns) * (side + 8), 8 + (i // columns) * (side + label_h + 8)
        canvas.paste(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST), (x, y))
        words, lines = label.split(), [""]
        for word in words:  # wrap to the cell width
            if draw.textlength(f"{lines[-1]} {word}".strip(), font=font) > side and lines[-1]:
                lines.append(word)
            else:
                lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text((x, y + side + 2), "\n".join(lines[:2]), fill="black", font=font, spacing=1)
    return canvas
