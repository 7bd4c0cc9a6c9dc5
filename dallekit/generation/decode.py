"""`dallekit decode`: token rows back to PNGs through the dVAE, for inspection."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
from PIL import Image

from dallekit.errors import BadInputError
from dallekit.images import save_image_grid
from dallekit.io import list_shards, read_shard
from dallekit.tokenize.image import ImageTokenizer
from dallekit.tokenize.tokens import check_image_codes, check_token_files, describe_tokenizer

SAFE_STEM = re.compile(r"[0-9A-Za-z_-]{1,64}")


def safe_stem(uid) -> str:
    """A file name stem for row data: the uid itself if it matches [0-9A-Za-z_-]{1,64}, else `uid.<hash>`."""
    text = str(uid)
    if SAFE_STEM.fullmatch(text) and text != "grid":  # grid.png is the overview
        return text
    # a uid such as `../x` or `/abs` must not choose the path; the dot keeps a hashed name from equalling any safe uid
    return "uid." + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def decode_tokens(tokens_dir: str, dvae: str, out_dir: str, limit: int = 64, device: str = "auto") -> list[Path]:
    """Decode up to `limit` rows to `<uid>.png` (see safe_stem) plus `grid.png`; the image tokenizer must be the one that encoded them."""
    paths = list_shards(tokens_dir)
    metadata = check_token_files(paths)
    tokenizer = ImageTokenizer.load(dvae, device)
    if metadata["image_tokenizer"] != tokenizer.metadata():
        raise BadInputError(f"{tokens_dir}: encoded with the image tokenizer {describe_tokenizer(metadata['image_tokenizer'])}, "
                            f"but {dvae} is {describe_tokenizer(tokenizer.metadata())}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, images = [], []
    for path in paths:
        table = read_shard(path, columns=["uid", "image_tokens"]).slice(0, limit - len(written))
        if table.num_rows == 0:  # an empty shard (every row of it rejected upstream)
            continue
        codes = np.asarray(table.column("image_tokens").combine_chunks().flatten()).reshape(table.num_rows, -1)
        check_image_codes(codes, metadata["image_tokenizer"], path)  # a hand-made file: a reshape or one_hot traceback, or FSQ codes wrapped silently
        for uid, image in zip(table.column("uid").to_pylist(), tokenizer.decode(codes)):
            stem = safe_stem(uid)
            if out / f"{stem}.png" in written:  # a uid seen twice keeps both images
                stem = f"{stem}.{len(written)}"
            png = out / f"{stem}.png"
            Image.fromarray(image).save(png)
            written.append(png)
            images.append(image)
        if len(written) >= limit:
            break
    if images:
        save_image_grid(images, out / "grid.png", min_side=1)
    return written
