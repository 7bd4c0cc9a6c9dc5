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


_DCT = _dct_matrix(HASH_SIDE)


def decode_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes to RGB; JPEGs decode at reduced scale when `draft_size` allows. Raises on bad bytes."""
    image = Image.open(io.BytesIO(data))
    if draft_size:
        image.draft("RGB", (draft_size, draft_size))
    if image.mode in ("RGBA", "LA", "P"):  # composite transparency on white, as img2dataset does
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def phash(data: bytes) -> int:
    """64-bit perceptual hash (imagehash's pHash algorithm) of image bytes; raises if they do not decode.

    The JPEG is decoded at 1/4 scale or less (DCT scaling), which decodes every block, so a
    truncated file still fails, at a fraction of the cost of a full decode.
    """
    image = Image.open(io.BytesIO(data))
    image.draft("L", (2 * HASH_SIDE, 2 * HASH_SIDE))
    gray = image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)  # (32, 32)
    low = (_DCT @ pixels @ _DCT.T)[:8, :8].ravel()  # (64,) lowest frequencies
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    """Bits that differ between two 64-bit hashes."""
    return (a ^ b).bit_count()
