"""Text tokenizers behind one interface; CLIP's BPE (shipped inside open_clip) is the default."""

from __future__ import annotations

import functools
import html


class ClipBpeTokenizer:
    """CLIP's byte-pair encoding: lowercased, ftfy-cleaned, 49408 ids including start/end tokens."""

    kind = "clip-bpe"

    def __init__(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self._bpe = SimpleTokenizer()
        self.vocab_size = len(self._bpe.encoder)

    def encode(self, text: str) -> list[int]:
        """BPE ids of a caption, without start/end tokens or padding."""
        return self._bpe.encode(text)

    def count(self, text: str) -> int:
        """len(encode(text)), faster: for ASCII text ftfy changes nothing, so only the cheap cleaning runs."""
        if not text.isascii():
            return len(self.encode(text))
        from open_clip.tokenizer import whitespace_clean

        bpe = self._bpe
        cleaned = whitespace_clean(html.unescape(html.unescape(text)).strip()).lower()
        return sum(len(bpe.bpe("".join(bpe.byte_encoder[b] for b in word.encode())).split(" ")) for word in bpe.pat.findall(cleaned))

    def decode(self, ids: list[int]) -> str:
        """Text back from ids."""
        return self._bpe.decode(ids).strip()


@functools.lru_cache(maxsize=1)
def default_text_tokenizer() -> ClipBpeTokenizer:
    """The default tokenizer, built once per process."""
    return ClipBpeTokenizer()
