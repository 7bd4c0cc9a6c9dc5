"""Vectorised hashes of Arrow string columns, for the passes that spread rows over buckets by a key.

`string_hash` reads every byte of each value (8 at a time, straight from Arrow's buffers, in
numpy), so keys that differ only in the middle, as URLs do, still spread evenly. It is a bucket
key, never an identity: rows with equal hashes are compared by value where that matters.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.lib.stride_tricks import as_strided

_SEED = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, a bijection of uint64 that spreads every input bit over the output."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _binary(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One large_binary array (64-bit offsets) of a string or binary column; nulls hash as empty values."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pc.cast(pc.fill_null(arr, "") if arr.null_count else arr, pa.large_binary())


def string_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A deterministic uint64 per value from its length and all its bytes (little-endian words, the same on every machine)."""
    arr = _binary(values)
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    start, length = offsets[:-1], np.diff(offsets)
    data = np.frombuffer(arr.buffers()[2], np.uint8) if n and arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    padded = np.concatenate([data[: offsets[-1] if n else 0], np.zeros(8, np.uint8)])  # a word may start in the last 7 bytes
    words = as_strided(padded, shape=(len(padded) - 7, 8), strides=(1, 1), writeable=False)  # the 8 bytes at each position
    order = np.argsort(-length, kind="stable")  # longest first: the values still running are always a prefix
    start, length = start[order], length[order]
    h = mix64(length.astype(np.uint64) ^ _SEED)
    running, at = int(np.count_nonzero(length)), 0
    while running:  # one round per 8 bytes of the longest value
        rest = length[:running] - at
        word = np.ascontiguousarray(words[start[:running] + at]).view("<u8").ravel()
        short = int(np.searchsorted(-rest, -8, side="right"))  # rest is descending: the values with under 8 bytes left follow
        if short < running:  # the bytes past a value's end belong to the next one: masked off
            word[short:] &= (np.uint64(1) << (rest[short:].astype(np.uint64) * np.uint64(8))) - np.uint64(1)
        h[:running] = mix64(h[:running] ^ word)
        running, at = int(np.searchsorted(-rest, -8, side="left")), at + 8  # the values with more than 8 bytes left
    out = np.empty_like(h)
    out[order] = h
    return out


def buckets_of(values: pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """The bucket (0..n_buckets-1) of each value, from `string_hash`; all 0 for one bucket, with nothing hashed."""
    if n_buckets <= 1:
        return np.zeros(len(values), np.int64)
    return (string_hash(values) % np.uint64(n_buckets)).astype(np.int64)
