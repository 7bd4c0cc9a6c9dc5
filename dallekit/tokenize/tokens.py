"""Token Parquet: the trainer's input, readable by any pandas or pyarrow user.

Columns: `uid` string, `caption` string, `text_tokens` list<uint16> (BPE ids, no BOS/EOS or
padding), `image_tokens` fixed_size_list<uint16>[grid*grid] (dVAE codes, row-major), with
`encode --hflip` `image_tokens_hflip` (the same type: the codes of the mirrored image), plus
optional pass-through columns. The schema metadata key `dallekit` holds JSON describing both
tokenizers; shards that disagree on it cannot be mixed.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dallekit.errors import BadInputError
from dallekit.io import shard_schema

FORMAT = "dallekit.tokens/1"
METADATA_KEY = b"dallekit"
HFLIP_COLUMN = "image_tokens_hflip"


def token_metadata(image_tokenizer: dict, text_tokenizer: dict) -> dict:
    """The JSON stored under the `dallekit` schema metadata key."""
    return {"format": FORMAT, "image_tokenizer": image_tokenizer, "text_tokenizer": text_tokenizer}


def token_table(uids, captions, text_tokens: list[list[int]], image_tokens: np.ndarray, metadata: dict, extra: dict | None = None,
                image_tokens_hflip: np.ndarray | None = None) -> pa.Table:
    """Build a token table with the documented types and metadata (and the mirrored images' codes when given)."""
    n_codes = metadata["image_tokenizer"]["grid"] ** 2
    flat_text = np.concatenate([np.asarray(t, dtype=np.uint16) for t in text_tokens]) if text_tokens else np.zeros(0, np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in text_tokens])]).astype(np.int32)

    def codes(values: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(values, np.uint16).reshape(-1), pa.uint16()), n_codes)

    columns = {
        "uid": pa.array(uids, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "text_tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_text, pa.uint16())),
        "image_tokens": codes(image_tokens),
        **({HFLIP_COLUMN: codes(image_tokens_hflip)} if image_tokens_hflip is not None else {}),
        **(extra or {}),
    }
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata).encode()})


def read_token_metadata(path: str) -> dict:
    """The `dallekit` metadata of one token file; bad input if it has none."""
    schema = shard_schema(path)[0]
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise BadInputError(f"{path}: no `dallekit` token metadata (expected a shard written by `dallekit encode`)")
    try:
        metadata = json.loads(raw)
    except ValueError:
        raise BadInputError(f"{path}: its `dallekit` token metadata is not JSON") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else metadata
        raise BadInputError(f"{path}: token format {found!r}, expected {FORMAT!r}")
    return metadata


def describe_tokenizer(entry: dict) -> str:
    """An `image_tokenizer` entry in words: its kind, settings and the start of its weights' sha256."""
    levels = f" levels {entry['levels']}" if entry.get("levels") else ""
    return (f"{entry.get('kind')}{levels} ({entry.get('codebook_size')} codes, {entry.get('grid')}x{entry.get('grid')} grid, "
            f"{entry.get('image_size')} px, sha256 {str(entry.get('sha256'))[:12]})")


def check_same_tokenizer(found: dict, expected: dict, found_where: str, expected_where: str, found_is: str = "made by") -> None:
    """Bad input naming both when two `image_tokenizer` entries are not the same tokenizer (`found_is`: "made by" for tokens, "is" for a tokenizer)."""
    if found != expected:
        raise BadInputError(f"{found_where}: {found_is} the image tokenizer {describe_tokenizer(found)}, "
                            f"but {expected_where} was trained on {describe_tokenizer(expected)}")


def check_image_codes(codes: np.ndarray, entry: dict, where: str) -> None:
    """Bad input naming `where` unless codes (rows, N) have grid*grid codes a row, each below the `image_tokenizer` entry's codebook_size."""
    n, size = entry["grid"] ** 2, entry["codebook_size"]
    if codes.shape[1] != n:
        raise BadInputError(f"{where}: image_tokens rows of {codes.shape[1]} codes, expected {n} ({entry['grid']}x{entry['grid']} grid)")
    if codes.size and int(codes.max()) >= size:
        row = int(np.argwhere(codes >= size)[0][0])
        raise BadInputError(f"{where}: image token {int(codes[row].max())} in row {row}, expected codes below {size} (the tokenizer's code count)")


def check_token_files(paths: list[str], expected: dict | None = None) -> dict:
    """The metadata shared by all token files; bad input naming the files and key that disagree."""
    if not paths:
        raise BadInputError("no token shards given")
    reference = expected if expected is not None else read_token_metadata(paths[0])
    where = "the model" if expected is not None else paths[0]
    for path in paths:
        metadata = read_token_metadata(path)
        if expected is not None:
            check_same_tokenizer(metadata["image_tokenizer"], reference["image_tokenizer"], path, "the model")
        for section in ("image_tokenizer", "text_tokenizer"):
            if metadata[section] != reference[section]:
                diff = sorted(k for k in set(metadata[section]) | set(reference[section]) if metadata[section].get(k) != reference[section].get(k))
                raise BadInputError(
                    f"{path}: {section} {', '.join(f'{k}={metadata[section].get(k)!r}' for k in diff)} "
                    f"disagrees with {where} ({', '.join(f'{k}={reference[section].get(k)!r}' for k in diff)})"
                )
    return reference


def check_hflip_column(folder: str, paths: list[str]) -> None:
    """Bad input unless every token shard has the mirrored images' codes that `train --hflip` draws from."""
    for path in paths:
        if HFLIP_COLUMN not in shard_schema(path)[0].names:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            raise BadInputError(f"{folder}: shard {name} has no `{HFLIP_COLUMN}` column, which --hflip trains on: rerun `dallekit encode` with --hflip")


class TokenBatches:
    """Streams (text (B, T), image (B, N)) int64 batches from token shards, for one rank and loader worker.

    Shard order is shuffled per epoch with a seeded RNG (the same order on every rank), shards
    are read one row group at a time, and batches are drawn at random from a bounded buffer of
    rows, so memory stays bounded however many shards there are. Ranks take every world-th
    shard of the epoch's order, loader workers every n_workers-th of those. Captions are
    truncated to T and padded with per-position padding ids. With `hflip`, a row's image is its
    mirror's codes (`image_tokens_hflip`) with probability 1/2, drawn per row and epoch from the
    worker's own seeded generator, so a resume that replays the skipped batches draws the same.
    Everything is vectorised: rows never pass through Python one by one.
    """

    def __init__(self, paths: list[str], text_len: int, pad_base: int, batch_size: int, seed: int = 0,
                 shuffle_buffer: int = 4096, rank: int = 0, world: int = 1, shuffle: bool = True, loop: bool = True, hflip: bool = False):
        self.paths, self.text_len, self.pad_base, self.batch_size = list(paths), text_len, pad_base, batch_size
        self.seed, self.buffer, self.rank, self.world, self.shuffle, self.loop = seed, shuffle_buffer, rank, world, shuffle, loop
        self.hflip = hflip

    def _groups(self, epoch: int, worker: int, n_workers: int, flips: np.random.Generator | None = None):
        """(text (R, T), image (R, N)) row groups of this worker's shards in one epoch."""
        import random

        columns = ["text_tokens", "image_tokens", *([HFLIP_COLUMN] if flips is not None else [])]
        order = list(self.paths)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        for path in order[self.rank :: self.world][worker::n_workers]:
            fs, p = fsspec.core.url_to_fs(path)
            with fs.open(p, "rb") as f:
                pf = pq.ParquetFile(f)
                for g in range(pf.num_row_groups):
                    if pf.metadata.row_group(g).num_rows:  # an empty shard has one empty group: nothing to yield
                        yield self._arrays(pf.read_row_group(g, columns=columns), flips)

    def _arrays(self, group: pa.Table, flips: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Padded text (R, T) int64 and image (R, N) uint16 arrays of a row group (each row's image or its mirror, with flips)."""
        text_col = group.column("text_tokens").combine_chunks()
        offsets = text_col.offsets.to_numpy()
        values = text_col.values.to_numpy(zero_copy_only=False)
        rows = len(text_col)
        lengths = np.minimum(np.diff(offsets), self.text_len)
        text = np.tile(np.arange(self.text_len, dtype=np.int64) + self.pad_base, (rows, 1))
        row = np.repeat(np.arange(rows), lengths)
        col = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        text[row, col] = values[offsets[:-1][row] + col]
        image = group.column("image_tokens").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(rows, -1)
        if flips is not None:
            mirrored = group.column(HFLIP_COLUMN).combine_chunks().values.to_numpy(zero_copy_only=False).reshape(rows, -1)
            image = np.where((flips.random(rows) < 0.5)[:, None], mirrored, image)
        return text, image

    def batches(self, worker: int = 0, n_workers: int = 1, epoch: int = 0, skip: int = 0):
        """Yield (epoch, text, image) numpy batches, skipping the first `skip` batches (exact resume)."""
        rng = np.random.default_rng([self.seed, self.rank, worker, n_workers])
        flips = np.random.default_rng([self.seed, self.rank, worker, n_workers, 1]) if self.hflip else None
        buffer = _RowBuffer()
        produced, keep = 0, self.buffer if self.shuffle else 0
        while True:
            rows = 0
            for text, image in self._groups(epoch, worker, n_workers, flips):
                rows += len(text)
                buffer.add(text, image)
                while buffer.n >= keep + self.batch_size:
                    batch = buffer.take(rng if self.shuffle else None, self.batch_size)
                    produced += 1
                    if produced > skip:
                        yield (epoch, *batch)
            if not self.loop:
                while buffer.n:
                    batch = buffer.take(rng if self.shuffle else None, min(self.batch_size, buffer.n))
                    yield (epoch, *batch)
                return
            if not rows:
                raise BadInputError(f"rank {self.rank}: no token rows in its shards (fewer shards than ranks x loader workers?)")
            keep = min(keep, rows // 2)  # a buffer larger than an epoch would mix several copies of a row into a batch
            epoch += 1


class _RowBuffer:
    """Rows waiting to be batched: preallocated arrays, random draws without replacement, swap-remove."""

    def __init__(self):
        self.text = self.image = None
        self.n = 0

    def add(self, text: np.ndarray, image: np.ndarray) -> None:
        if self.text is None:
            self.text, self.image = np.empty((0, text.shape[1]), np.int64), np.empty((0, image.shape[1]), image.dtype)
        if self.n + len(text) > len(self.text):
            size = max(2 * len(self.text), self.n + len(text))
            self.text = np.concatenate([self.text[: self.n], np.empty((size - self.n, text.shape[1]), np.int64)])
            self.image = np.concatenate([self.image[: self.n], np.empty((size - self.n, image.shape[1]), image.dtype)])
        self.text[self.n : self.n + len(text)] = text
        self.image[self.n : self.n + len(image)] = image
        self.n += len(text)

    def take(self, rng, count: int) -> tuple[np.ndarray, np.ndarray]:
        """`count` rows, at random (or the first ones when rng is None), removed from the buffer."""
        n = self.n
        picks = np.sort(rng.choice(n, count, replace=False)) if rng is not None else np.arange(count)
        text, image = self.text[picks], self.image[picks].astype(np.int64)
        if rng is None:
            self.text[: n - count], self.image[: n - count] = self.text[count:n], self.image[count:n]
        else:
            tail = np.arange(n - count, n)
            source = tail[~np.isin(tail, picks)]  # tail rows that stay
            dest = picks[picks < n - count]  # holes outside the tail
            self.text[dest], self.image[dest] = self.text[source], self.image[source]
        self.n = n - count
        return text, image


class _TokenDataset(IterableDataset):
    def __init__(self, batches: TokenBatches, n_workers: int, start_batch: int):
        self.source, self.n_workers, self.start_batch = batches, max(n_workers, 1), start_batch

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # the DataLoader takes batches from its workers in turn, so worker w made every n-th batch
        skip = len(range(worker, self.start_batch, self.n_workers))
        for epoch, text, image in self.source.batches(worker, self.n_workers, skip=skip):
            yield epoch, torch.from_numpy(text), torch.from_numpy(image)


def token_loader(batches: TokenBatches, num_workers: int, start_batch: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader of (epoch, text (B, T), image (B, N)) that starts after `start_batch` batches."""
    return DataLoader(
        _TokenDataset(batches, num_workers, start_batch), batch_size=None, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )
