"""Multi-index hashing of 64-bit pHashes for the near-duplicate passes (`pipeline/dedup/candidates.py`).

Two hashes within `distance` bits agree exactly on at least k - distance of k blocks (the
pigeonhole principle), so each table keys the rows by a choice of k - distance blocks, and only
rows with equal keys are compared. The blocks are chosen so the shortest key still spreads N rows.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

MAX_BLOCKS = 8  # past it (N > 2^30 at d=4) runs lengthen and compared pairs grow as N^2 / 2^(key bits)
HIST_BITS = 16  # the histogram of a leading block counts at most its top 16 bits
_BYTE_BITS = np.array([(i).bit_count() for i in range(256)], np.uint8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BYTE_BITS[x.view(np.uint8).reshape(-1, 8)].sum(axis=1, dtype=np.uint8)


def block_edges(k: int) -> list[int]:
    """Bit positions (from the most significant) cutting 64 bits into k nearly equal blocks."""
    return [round(i * 64 / k) for i in range(k + 1)]


def choose_blocks(n: int, distance: int) -> int:
    """The fewest blocks k (d+1 <= k <= 8) whose shortest table key has >= log2(n)+2 bits; 8 (or d+1 past it) when none has."""
    need, low = math.log2(max(n, 1)) + 2, distance + 1
    for k in range(low, max(low, MAX_BLOCKS) + 1):
        edges = block_edges(k)
        if sum(sorted(b - a for a, b in itertools.pairwise(edges))[: k - distance]) >= need:
            return k
    return max(low, MAX_BLOCKS)


def tables_led_by(k: int, distance: int, lead: int) -> list[tuple[int, ...]]:
    """The tables (blocks keyed on, ascending) whose key starts with block `lead`."""
    return [c for c in itertools.combinations(range(k), k - distance) if c[0] == lead]


def lead_bits(ph: np.ndarray, k: int, lead: int) -> np.ndarray:
    """The top (at most 16) bits of block `lead` of each hash: what the table partitions and histograms use."""
    edges = block_edges(k)
    bits = min(edges[lead + 1] - edges[lead], HIST_BITS)
    return ((ph >> np.uint64(64 - edges[lead] - bits)) & np.uint64((1 << bits) - 1)).astype(np.int64)


def table_key(ph: np.ndarray, k: int, blocks: tuple[int, ...]) -> np.ndarray:
    """The concatenated values of `blocks` of each hash, the leading block most significant."""
    edges, key = block_edges(k), np.zeros(len(ph), np.uint64)
    for i in blocks:
        width = edges[i + 1] - edges[i]
        value = (ph >> np.uint64(64 - edges[i + 1])) & np.uint64((1 << width) - 1)
        key = value if width == 64 else (key << np.uint64(width)) | value
    return key


def sorted_keys(ph: np.ndarray, k: int, blocks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A table's keys sorted, and the entries in that order; when key and index fit in 64 bits, one plain sort of both."""
    keys, n = table_key(ph, k, blocks), len(ph)
    edges, index_bits = block_edges(k), max(1, (n - 1).bit_length())
    if sum(edges[i + 1] - edges[i] for i in blocks) + index_bits > 64:
        order = np.argsort(keys)
        return keys[order], order
    packed = np.sort((keys << np.uint64(index_bits)) | np.arange(n, dtype=np.uint64))  # 4x faster than an argsort
    return packed >> np.uint64(index_bits), (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64)


def histograms(ph: np.ndarray, k: int, distance: int) -> list[list[int]]:
    """The counts of each leading block's top bits for k blocks (the driver sizes table tasks from them)."""
    edges = block_edges(k)
    return [np.bincount(lead_bits(ph, k, j), minlength=1 << min(edges[j + 1] - edges[j], HIST_BITS)).tolist()
            for j in range(distance + 1)]


def key_ranges(hist: np.ndarray, limit: int) -> list[int]:
    """First values of consecutive histogram bins grouped to hold at most `limit` entries each (a heavier bin alone)."""
    starts, total = [0], 0
    for value, count in enumerate(np.asarray(hist).tolist()):
        if total and total + count > limit:
            starts.append(value)
            total = 0
        total += count
    return starts


def equal_key_pairs(keys: np.ndarray, ph: np.ndarray, distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(i, j, bits) of the pairs i < j of equal `keys` (sorted) whose hashes are within `distance` bits, and the pairs compared.

    Vectorised by offset: step s compares every entry with the one s places later in its run,
    so the Python loop runs (longest run - 1) times and the work is the number of pairs.
    """
    n = len(keys)
    active, step, compared, found = np.flatnonzero(keys[1:] == keys[:-1]), 1, 0, []
    while active.size:  # sorted keys: keys[i] == keys[i+s] implies keys[i] == keys[i+s-1], so the set only shrinks
        other = active + step
        bits = popcount(ph[active] ^ ph[other])
        hit = bits <= distance
        found.append((active[hit], other[hit], bits[hit]))
        compared += int(active.size)
        step += 1
        active = active[active + step < n]
        active = active[keys[active + step] == keys[active]]
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8), 0
    i, j, bits = (np.concatenate(x) for x in zip(*found))
    return i, j, bits, compared
