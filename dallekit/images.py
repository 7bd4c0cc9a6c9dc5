"""Image bytes -> pixels and perceptual hashes, shared by the stages that look at images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

HASH_SIDE = 32  # pHash works on a 32x32 grayscale image and keeps the 8x8 lowest DCT frequencies


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix, so that D @ x @ D.T is the 2-D DCT of x."""
    k = np.arange(n)
    d = np.sqrt(2 / n) * np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))
    d[0] /= np.sqrt(2)
    return d


_DCT8 = _dct_matrix(HASH_SIDE)[:8]  # (8, 32): only the lowest frequencies are needed


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to RGB; JPEGs decode at reduced scale when `draft_size` allows. Raises on bad bytes."""
    if data is None:
        raise ValueError("no image bytes")
    image = Image.open(io.BytesIO(data))
    if draft_size:
        image.draft("RGB", (draft_size, draft_size))
    if image.mode in ("RGBA", "LA", "P"):  # composite transparency on white, as img2dataset does
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


class UndecodableImage(ValueError):
    """The bytes are not a complete image."""


def decode_gray_reduced(data: bytes) -> np.ndarray:
    """Grayscale pixels (H/8, W/8) of image bytes; raises UndecodableImage for bad or truncated bytes.

    OpenCV decodes JPEGs at 1/8 scale in the DCT domain (about 4x faster than a full decode), but
    fills a truncated JPEG with gray instead of failing, so the end-of-image marker is checked first.
    """
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]:
        raise UndecodableImage("truncated JPEG (no end-of-image marker)")
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    if pixels is None or pixels.size == 0:
        raise UndecodableImage("not a decodable image")
    return pixels


def phash(data: bytes) -> int:
    """64-bit perceptual hash (imagehash's pHash algorithm) of image bytes; raises UndecodableImage.

    DCT of the 32x32 grayscale image, its 8x8 lowest frequencies compared with their median.
    """
    import cv2

    small = decode_gray_reduced(data)
    if small.shape != (HASH_SIDE, HASH_SIDE):
        small = cv2.resize(small, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)
    pixels = small.astype(np.float64)  # (32, 32)
    low = (_DCT8 @ pixels @ _DCT8.T).ravel()  # (64,) the 8x8 lowest frequencies of the 2-D DCT
    ordered = np.sort(low)
    bits = low > (ordered[31] + ordered[32]) / 2  # above the median
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes."""
    return (a ^ b).bit_count()


def load_square(data: bytes, size: int) -> np.ndarray:
    """Decode, resize the shorter side to `size` and centre-crop: (size, size, 3) uint8, as the dVAE expects."""
    try:
        image = decode_rgb(data, draft_size=size)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UndecodableImage(str(err)) from None
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
