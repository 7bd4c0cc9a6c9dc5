"""Text tokenizers behind one interface; CLIP's BPE (shipped inside open_clip) is the default."""

from __future__ import annotations

import functools


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

    def decode(self, ids: list[int]) -> str:
        """Text back from ids."""
        return self._bpe.decode(ids).strip()


@functools.lru_cache(maxsize=1)
def default_text_tokenizer() -> ClipBpeTokenizer:
    """The default tokenizer, built once per process."""
    return ClipBpeTokenizer()
