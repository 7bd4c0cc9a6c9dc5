"""The encode stage's images/s vs a bare dvae.encode(batch) loop on already-decoded tensors.

Downloads and cleans N generated 256 px JPEGs on loopback, then, with the same randomly initialised dVAE
(preset `small` by default), batch size and torch threads, in one process:
  bare:  model.encode on uint8 images already decoded, resized and cropped, as float tensors;
  stage: `encode` on an in-process Dask worker: JPEG decode, resize, crop, caption BPE, Parquet.
The two alternate in rounds (ABAB...: bare, then the stage into a fresh folder). Also reports
bytes per image token on disk (zstd): the image_tokens column alone and whole files.
Last line: ratio=<median over rounds of stage images/s / bare images/s>. Target >= 0.8.

    python benchmarks/encode_overhead.py [--n 1024] [--preset small] [--batch-size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, downloaded_shapes, print_rounds  # noqa: E402

from dallekit.config import CleanConfig, ClusterConfig, EncodeConfig  # noqa: E402
from dallekit.images import load_square  # noqa: E402
from dallekit.io import list_shards, read_shard  # noqa: E402
from dallekit.models.dvae import (  # noqa: E402
    DVAE,
    dvae_config,
    save_dvae_config,  # noqa: E402
)
from dallekit.models.weights import save_model  # noqa: E402
from dallekit.pipeline.clean import clean  # noqa: E402
from dallekit.pipeline.cluster import dask_client  # noqa: E402
from dallekit.pipeline.encode import encode, plan_encode  # noqa: E402
from dallekit.tokenize.image import cached_image_tokenizer  # noqa: E402


def token_bytes(folder: Path) -> tuple[float, float, int]:
    """(image_tokens column bytes per token, file bytes per image token, image tokens) of token shards."""
    column, files, tokens = 0, 0, 0
    for path in folder.glob("part-*.parquet"):
        meta = pq.ParquetFile(path).metadata
        files += path.stat().st_size
        grid_tokens = pq.read_schema(path).field("image_tokens").type.list_size
        tokens += meta.num_rows * grid_tokens
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                chunk = meta.row_group(g).column(c)
                if chunk.path_in_schema.startswith("image_tokens"):
                    column += chunk.total_compressed_size
    return column / tokens, files / tokens, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of bare then stage")
    parser.add_argument("--dvae", help="a trained dVAE folder instead of random weights (its codes compress like real ones)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    torch.manual_seed(0)
    if args.dvae:
        shutil.copytree(args.dvae, work / "dvae", ignore=shutil.ignore_patterns("checkpoint*", "*.png", "metrics.jsonl"))
    else:
        config = dvae_config(args.preset)
        save_model(work / "dvae", DVAE(config), save_dvae_config(config))
    options = EncodeConfig(batch_size=args.batch_size)
    with dask_client(ClusterConfig(workers=1, threads_per_worker=1, processes=False), quiet=True) as client:
        downloaded = work / "clean"  # encode reads a cleaned (or filtered) stage; no near-dup removal, so the images stay
        clean(str(downloaded_shapes(work, args.n, client, shard_size=256)), str(downloaded), CleanConfig(near_dup_distance=-1), client)
        plan = plan_encode(str(downloaded), str(work / "dvae"), options)  # loads the dVAE, shared with the in-process worker
        tokenizer = cached_image_tokenizer(str(work / "dvae"), options.device)
        config = tokenizer.config

        images = np.stack([load_square(b, config.image_size) for p in list_shards(str(downloaded)) for b in read_shard(p, columns=["jpg"]).column("jpg").to_pylist()])
        tensors = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # decoded before the clock
        tokenizer.model.encode(tensors[: args.batch_size])  # warm-up
        n = len(images)

        def bare() -> float:
            start = time.perf_counter()
            for i in range(0, n, args.batch_size):
                tokenizer.model.encode(tensors[i : i + args.batch_size])
            return n / (time.perf_counter() - start)

        def stage() -> float:
            shutil.rmtree(work / "tokens", ignore_errors=True)
            start = time.perf_counter()
            stats = encode(str(downloaded), str(work / "dvae"), str(work / "tokens"), options, client, plan=plan)
            seconds = time.perf_counter() - start
            assert stats["rows_out"] == n, stats
            return n / seconds

        results = alternate(args.rounds, bare, stage)
        per_column, per_file, n_tokens = token_bytes(work / "tokens")
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    weights = f"trained weights from {args.dvae}" if args.dvae else f"preset {args.preset}, random weights"
    print(f"dVAE {config.image_size} px, {config.grid}x{config.grid} grid, {config.codebook_size} codes ({weights}), {n} images, batch {args.batch_size}")
    print("bare: dvae.encode on decoded tensors; stage: encode (decode, resize, Parquet)")
    print(f"bytes per image token on disk (zstd): image_tokens column {per_column:.3f}, whole files {per_file:.3f} ({n_tokens} tokens)")
    print_rounds(results, "bare", "stage", "images/s")


if __name__ == "__main__":
    main()
