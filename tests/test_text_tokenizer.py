"""The CLIP BPE tokenizer's fast token count agrees with its full encoder."""

from __future__ import annotations

import random

from dallekit.pipeline.clean import repair_caption
from dallekit.tokenize.text import default_text_tokenizer

WORDS = [
    "a", "red", "circle", "on", "background", "Photo", "DOG's", "&amp;", "&lt;b&gt;", "it's", "co-op", "U.S.A.", "3.5mm",
    "#tag", "@user", "\t", "  ", "don't", "ROCK&ROLL", "x" * 40, "http://a.b/c?d=e", "--", '"quoted"', "café", "naïve", "日本",
]


def test_count_equals_len_encode():
    tokenizer = default_text_tokenizer()
    rng = random.Random(0)
    for _ in range(500):
        caption = repair_caption(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))))
        assert tokenizer.count(caption) == len(tokenizer.encode(caption)), caption
    assert tokenizer.encode("a red circle") == [320, 736, 7117]
    assert tokenizer.decode(tokenizer.encode("a red circle")) == "a red circle"
