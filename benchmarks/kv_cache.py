"""KV-cache generation against full recompute for the tiny transformer: one full 8x8 image per row.

After one warm-up of each, full recompute and the KV cache alternate in rounds (ABAB...) on the
same prompts and seed. Prints images/s of both per round and, as its last line,
ratio=<median over rounds of cached images/s / full-recompute images/s>.

    python benchmarks/kv_cache.py [--batch 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import alternate, print_rounds

from dallekit.models.transformer import DalleTransformer, dalle_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of full recompute then cached")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DalleTransformer(dalle_config("tiny", text_vocab=256, image_vocab=128, grid=8)).eval()
    text = model.pad_text([[1, 2, 3]] * args.batch)

    def rate(cache: bool) -> float:
        """Images per second of one generate call."""
        start = time.perf_counter()
        model.generate(text, generator=torch.Generator().manual_seed(0), use_cache=cache)
        return args.batch / (time.perf_counter() - start)

    for cache in (False, True):
        model.generate(text[:1], use_cache=cache)  # warm-up
    results = alternate(args.rounds, lambda: rate(False), lambda: rate(True))
    print_rounds(results, "full recompute", "cached", "images/s")


if __name__ == "__main__":
    main()
