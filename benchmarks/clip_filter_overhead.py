"""CLIP scoring through the filter stage vs bare open_clip encode_image/encode_text, in one process.

Downloads N generated 256 px JPEGs on loopback, then, with the same open_clip model (ViT-B-32,
random weights: pretrained weights cannot be fetched here and the cost is the same), batch
size and torch threads:
  bare:  model.encode_image / encode_text on tensors already decoded, preprocessed and tokenized;
  stage: `filter` with CLIP on an in-process Dask worker: JPEG decode, preprocessing,
         tokenization, the other rules, and Parquet writing included.
The two alternate in rounds (ABAB...: bare, then the stage into a fresh folder). Prints images/s
of both per round and, as its last line, ratio=<median over rounds of stage images/s / bare
images/s>. Target >= 0.8.

    python benchmarks/clip_filter_overhead.py [--n 384] [--batch-size 64] [--model ViT-B-32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, downloaded_shapes, print_rounds  # noqa: E402

from dallekit.config import CleanConfig, ClusterConfig, FilterConfig  # noqa: E402
from dallekit.images import decode_rgb  # noqa: E402
from dallekit.io import list_shards, read_shard  # noqa: E402
from dallekit.models.clip import cached_clip  # noqa: E402
from dallekit.pipeline.clean import clean  # noqa: E402
from dallekit.pipeline.cluster import dask_client  # noqa: E402
from dallekit.pipeline.filter import filter, plan_filter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of bare then stage")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    cluster = ClusterConfig(workers=1, threads_per_worker=1, processes=False)  # one process
    config = FilterConfig(
        clip_model=args.model, clip_pretrained=None, clip_threshold=-1.0, clip_batch_size=args.batch_size,
        min_side=0, max_aspect=math.inf, languages=["any"],
    )
    with dask_client(cluster, quiet=True) as client:
        downloaded = downloaded_shapes(work, args.n, client, shard_size=128)
        clean(str(downloaded), str(work / "clean"), CleanConfig(near_dup_distance=-1), client)
        plan = plan_filter(str(work / "clean"), config)  # loads the model once, shared with the in-process worker
        scorer = cached_clip(config.clip_model, config.clip_pretrained, None, config.device)

        # bare: decode, preprocess and tokenize outside the clock
        table = [read_shard(p, columns=["jpg", "caption"]) for p in list_shards(str(work / "clean"))]
        images = [decode_rgb(b) for t in table for b in t.column("jpg").to_pylist()]
        captions = [c for t in table for c in t.column("caption").to_pylist()]
        pixels = torch.stack([scorer.preprocess(im) for im in images])
        tokens = scorer.tokenizer(captions)
        n = len(images)
        with torch.no_grad():
            scorer.model.encode_image(pixels[: args.batch_size])  # warm-up

        def bare() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                for i in range(0, n, args.batch_size):
                    a = scorer.model.encode_image(pixels[i : i + args.batch_size])
                    b = scorer.model.encode_text(tokens[i : i + args.batch_size])
                    (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1)
            return n / (time.perf_counter() - start)

        def stage() -> float:
            shutil.rmtree(work / "filter", ignore_errors=True)
            start = time.perf_counter()
            stats = filter(str(work / "clean"), str(work / "filter"), config, client, plan=plan)
            seconds = time.perf_counter() - start
            assert stats["rows_out"] == n, stats
            return n / seconds

        results = alternate(args.rounds, bare, stage)
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.model} (random weights), {n} images, batch {args.batch_size}; bare: encode_image + encode_text, stage: filter with CLIP")
    print_rounds(results, "bare", "stage", "images/s")


if __name__ == "__main__":
    main()
