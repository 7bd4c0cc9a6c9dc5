"""The embed stage vs bare open_clip encode_image/encode_text on the same images, in one process.

Downloads N generated 256 px JPEGs (the demo's shapes) on loopback, then, with the same open_clip
model (ViT-B-32, random weights: pretrained weights cannot be fetched here and the cost is the
same), batch size and torch threads:
  bare:  model.encode_image / encode_text on tensors already decoded, preprocessed and tokenized;
  stage: `embed` on an in-process Dask worker: Parquet reading, the header checks, JPEG decode at
         the reduced draft size, preprocessing, tokenization, float16 columns and the atomic
         shard writes included.
The two alternate in rounds (ABAB...: bare, then the stage into a fresh folder). Prints images/s
of both per round and, as its last line, ratio=<median over rounds of stage images/s / bare
images/s> (= bare time / stage time). Target >= 0.8.

    python benchmarks/embed_overhead.py [--n 256] [--batch-size 64] [--model ViT-B-32] [--rounds 3] [--device cpu]
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, downloaded_shapes, print_rounds  # noqa: E402

from dallekit.config import ClusterConfig, EmbedConfig  # noqa: E402
from dallekit.images import decode_rgb  # noqa: E402
from dallekit.io import list_shards, read_shard  # noqa: E402
from dallekit.pipeline.cluster import dask_client  # noqa: E402
from dallekit.pipeline.embed import embed, load_scorer, plan_embed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of bare then stage")
    parser.add_argument("--device", default="cpu", help="torch device of both sides (cpu, cuda)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dallekit-bench-"))
    cluster = ClusterConfig(workers=1, threads_per_worker=1, processes=False)  # one process: the same model and torch threads
    config = EmbedConfig(clip_model=args.model, clip_pretrained=None, batch_size=args.batch_size, device=args.device)
    with dask_client(cluster, quiet=True) as client:
        downloaded = downloaded_shapes(work, args.n, client, shard_size=128)
        plan = plan_embed(str(downloaded), config)  # loads the model once, shared with the in-process worker
        scorer = load_scorer(config)
        model, device = scorer.model, scorer.device

        # bare: decode, preprocess and tokenize outside the clock
        tables = [read_shard(p, columns=["jpg", "caption"]) for p in list_shards(str(downloaded))]
        images = [decode_rgb(b) for t in tables for b in t.column("jpg").to_pylist()]
        captions = [c for t in tables for c in t.column("caption").to_pylist()]
        pixels = torch.stack([scorer.preprocess(im) for im in images]).to(device)
        tokens = scorer.tokenizer(captions).to(device)
        n = len(images)
        with torch.no_grad():
            model.encode_image(pixels[: args.batch_size])  # warm-up
            model.encode_text(tokens[: args.batch_size])

        def bare() -> float:
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
                for i in range(0, n, args.batch_size):
                    a = torch.nn.functional.normalize(model.encode_image(pixels[i : i + args.batch_size]).float(), dim=-1)
                    b = torch.nn.functional.normalize(model.encode_text(tokens[i : i + args.batch_size]).float(), dim=-1)
                    a.cpu(), b.cpu()
            return n / (time.perf_counter() - start)

        def stage() -> float:
            shutil.rmtree(work / "embed", ignore_errors=True)
            start = time.perf_counter()
            stats = embed(str(downloaded), str(work / "embed"), config, client, plan=plan)
            seconds = time.perf_counter() - start
            assert stats["rows_out"] == n, stats
            return n / seconds

        results = alternate(args.rounds, bare, stage)
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    print(f"{args.model} (random weights), {n} images, batch {args.batch_size}; bare: encode_image + encode_text, stage: embed")
    print_rounds(results, "bare", "stage", "images/s")


if __name__ == "__main__":
    main()
