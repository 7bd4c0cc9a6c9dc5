"""Tokens/s of dallekit's Parquet token loader vs a nanoGPT-style np.memmap random-batch reader.

Writes the same random token rows twice: as token Parquet shards (what `dallekit encode`
writes) and as one flat uint16 file of fixed-size rows (text padded to T, then the image
tokens), then times batches of int64 tensors from each: nanoGPT's reader draws random rows
from the memmap; dallekit's streams shards with its shuffle buffer through a DataLoader in the
process. The two alternate in rounds (ABAB...); the loader with worker processes is timed once
after them, for information. Last line: ratio=<median over rounds of dallekit tokens/s / memmap
tokens/s>. Target >= 0.5.

    python benchmarks/loader_vs_memmap.py [--rows 200000] [--grid 16] [--batch-size 64] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import alternate, print_rounds

from dallekit.tokenize.tokens import (
    TokenBatches,
    token_loader,
    token_metadata,
    token_table,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes for the extra dallekit line")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of memmap then dallekit")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    rng = np.random.default_rng(0)
    T, N, vocab = args.text_len, args.grid**2, 49408
    meta = token_metadata({"kind": "bench", "codebook_size": 8192, "grid": args.grid, "image_size": 8 * args.grid, "sha256": "-"},
                          {"kind": "clip-bpe", "vocab_size": vocab})
    rows_per_shard = 10_000
    flat = np.memmap(work / "tokens.bin", dtype=np.uint16, mode="w+", shape=(args.rows, T + N))
    for s in range(0, args.rows, rows_per_shard):
        n = min(rows_per_shard, args.rows - s)
        lengths = rng.integers(5, T, n)
        texts = [rng.integers(0, vocab, k) for k in lengths]
        images = rng.integers(0, 8192, (n, N))
        pq.write_table(token_table([str(i) for i in range(s, s + n)], ["c"] * n, texts, images, meta),
                       work / f"part-{s // rows_per_shard:05d}.parquet", compression="zstd")
        padded = np.tile(np.arange(T) + vocab, (n, 1))
        for i, t in enumerate(texts):
            padded[i, : len(t)] = t
        flat[s : s + n] = np.concatenate([padded, images], axis=1)
    flat.flush()
    tokens_per_batch = args.batch_size * (T + N)

    paths = sorted(str(p) for p in work.glob("part-*.parquet"))

    def memmap_rate() -> float:
        """nanoGPT: a fresh memmap per batch, random rows, int64 tensors."""
        start = time.perf_counter()
        for _ in range(args.batches):
            data = np.memmap(work / "tokens.bin", dtype=np.uint16, mode="r", shape=(args.rows, T + N))
            idx = np.sort(rng.integers(0, args.rows, args.batch_size))
            block = torch.from_numpy(data[idx].astype(np.int64))
            _text, _image = block[:, :T], block[:, T:]  # the split a training step does
        return args.batches * tokens_per_batch / (time.perf_counter() - start)

    def dallekit_rate(workers: int = 0) -> float:
        source = TokenBatches(paths, T, vocab, args.batch_size, seed=0, shuffle_buffer=4096)
        loader = iter(token_loader(source, workers))
        next(loader)  # workers started and first row groups read: start-up is not throughput
        start = time.perf_counter()
        for _ in range(args.batches):
            _, text, image = next(loader)
        return args.batches * tokens_per_batch / (time.perf_counter() - start)

    results = alternate(args.rounds, memmap_rate, dallekit_rate)
    with_workers = dallekit_rate(args.workers)
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.rows} rows of {T} text + {N} image tokens, batch {args.batch_size}")
    print(f"dallekit Parquet loader with {args.workers} worker processes (once): {with_workers:.0f} tokens/s")
    print("(worker processes overlap loading with training; alone they pay the DataLoader's inter-process copies)")
    print_rounds(results, "np.memmap", "dallekit", "tokens/s")


if __name__ == "__main__":
    main()
