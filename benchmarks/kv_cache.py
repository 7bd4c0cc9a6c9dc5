"""KV-cache generation against full recompute for the tiny transformer: one full 8x8 image per row."""

from __future__ import annotations

import argparse
import time

import torch

from dallekit.models.transformer import DalleTransformer, dalle_config


def best_of(runs: int, fn) -> float:
    """The fastest of several timed calls: other processes on shared cores only slow some runs."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DalleTransformer(dalle_config("tiny", text_vocab=256, image_vocab=128, grid=8)).eval()
    text = model.pad_text([[1, 2, 3]] * args.batch)
    seconds = {}
    for cache in (False, True):
        model.generate(text[:1], use_cache=cache)  # warm-up
        seconds[cache] = best_of(args.rounds, lambda: model.generate(text, generator=torch.Generator().manual_seed(0), use_cache=cache))
        print(f"use_cache={cache} seconds={seconds[cache]:.3f} images={args.batch}")
    print(f"ratio={seconds[False] / seconds[True]:.2f}")  # full recompute time / cached time


if __name__ == "__main__":
    main()
