"""Vectorised hashes of Arrow string columns, for the passes that spread rows over buckets by a key.

`string_hash` reads every byte of each value (8 at a time, straight from Arrow's buffers, in
numpy), so keys that differ only in the middle, as URLs do, still spread evenly. It is a bucket
key, never an identity: rows with equal hashes are compared by value where that matters.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_SEED = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """splitmix64's finaliser, a bijection of uint64 that spreads every input bit over the output; mixes `x` in place.

    `scratch` (x's shape) spares the temporaries: in a Dask worker every large one is a fresh mmap (MALLOC_TRIM_THRESHOLD_).
    """
    t = np.empty_like(x) if scratch is None else scratch
    for shift, factor in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None)):
        np.right_shift(x, np.uint64(shift), out=t)
        x ^= t
        if factor is not None:
            x *= np.uint64(factor)
    return x


def _binary(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One large_binary array (64-bit offsets) of a string or binary column; nulls hash as empty values."""
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return pc.cast(pc.fill_null(arr, "") if arr.null_count else arr, pa.large_binary())


def string_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A deterministic uint64 per value from its length and all its bytes (little-endian words, the same on every machine)."""
    arr = _binary(values)
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8) if n and arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    padded = np.concatenate([data[: offsets[-1] if n else 0], np.zeros(8, np.uint8)])  # a word may start in the last 7 bytes
    words = np.ndarray((len(padded) - 7,), "<u8", buffer=padded, strides=(1,))  # the (unaligned) 8 bytes at each position
    length = np.diff(offsets)
    order = np.argsort(-length, kind="stable")  # longest first: the values still running are always a prefix
    start, length = offsets[:-1][order], length[order]
    shorter = -length  # ascending: np.searchsorted counts the values of at least / more than some length
    scratch, index = np.empty(n, np.uint64), np.empty(n, np.int64)
    h = mix64(length.astype(np.uint64) ^ _SEED, scratch)
    running, at = int(np.searchsorted(shorter, 0, side="left")), 0
    while running:  # one round per 8 bytes of the longest value, in buffers allocated once
        np.add(start[:running], at, out=index[:running])
        word = words[index[:running]]  # a gather into a new array: np.take's out= is 20x slower on unaligned words
        full = int(np.searchsorted(shorter, -(at + 8), side="right"))  # the values with 8 bytes or more left
        if full < running:  # the bytes past a value's end belong to the next one: masked off
            mask = scratch[full:running]
            np.subtract(length[full:running], at, out=mask, casting="unsafe")
            np.left_shift(np.uint64(1), mask << np.uint64(3), out=mask)
            mask -= np.uint64(1)
            word[full:] &= mask
        word ^= h[:running]
        h[:running] = mix64(word, scratch[:running])
        at += 8
        running = int(np.searchsorted(shorter, -at, side="left"))  # the values with bytes left
    out = np.empty_like(h)
    out[order] = h
    return out
