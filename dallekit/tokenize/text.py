"""Text tokenizers behind one interface: CLIP's BPE (shipped inside open_clip) or a BPE trained here.

Both expose `kind`, `vocab_size`, `encode`, `decode`, `count` and `metadata()`; token files
record the metadata and `load_text_tokenizer` rebuilds the tokenizer from it.
"""

from __future__ import annotations

import functools
import hashlib
import html
from pathlib import Path

from dallekit.errors import BadInputError


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

    def metadata(self) -> dict:
        """The `text_tokenizer` entry of token-file metadata."""
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class TrainedBpeTokenizer:
    """A byte-level BPE trained with the `tokenizers` library (`dallekit train-bpe`), lowercasing like DALL-E."""

    kind = "bpe"

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise BadInputError(f"{path}: no tokenizer.json (train one with `dallekit train-bpe`)")
        self.path = str(file.resolve())  # absolute: token metadata must find it from any working directory
        self._tok = Tokenizer.from_file(self.path)
        self.vocab_size = self._tok.get_vocab_size()
        self.sha256 = hashlib.sha256(file.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """BPE ids of a caption, no special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        """Number of BPE ids."""
        return len(self.encode(text))

    def decode(self, ids: list[int]) -> str:
        """Text back from ids."""
        return self._tok.decode(ids)

    def metadata(self) -> dict:
        """The `text_tokenizer` entry of token-file metadata."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "path": self.path, "sha256": self.sha256}


@functools.lru_cache(maxsize=1)
def default_text_tokenizer() -> ClipBpeTokenizer:
    """The default tokenizer, built once per process."""
    return ClipBpeTokenizer()


@functools.lru_cache(maxsize=8)
def load_text_tokenizer(spec: str = "clip-bpe"):
    """'clip-bpe' or the path of a trained tokenizer (folder or tokenizer.json), once per process."""
    return default_text_tokenizer() if spec == "clip-bpe" else TrainedBpeTokenizer(spec)


def train_bpe(captions, out_dir: str, vocab_size: int = 16384, min_frequency: int = 2) -> TrainedBpeTokenizer:
    """Train a lowercasing byte-level BPE on an iterable of captions and save tokenizer.json."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True
    )
    tokenizer.train_from_iterator(captions, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    return TrainedBpeTokenizer(str(out))
