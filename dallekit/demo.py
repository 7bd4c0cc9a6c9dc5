"""The embedded default job: synthetic shapes served on 127.0.0.1, run through the pipeline stages."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

from pathlib import Path

from dallekit.config import (
    CleanConfig,
    ClusterConfig,
    DownloadConfig,
    EncodeConfig,
    FilterConfig,
    IngestConfig,
    TrainClipConfig,
    TrainConfig,
    TrainDVAEConfig,
)
from dallekit.pipeline.clean import clean
from dallekit.pipeline.cluster import dask_client
from dallekit.pipeline.download import download
from dallekit.pipeline.encode import encode
from dallekit.pipeline.filter import filter_stage
from dallekit.pipeline.ingest import ingest
from dallekit.pipeline.shards import format_summary, list_shards, read_shard
from dallekit.synthetic import ShapesServer, make_dataset
from dallekit.tokenize.text import train_bpe
from dallekit.evaluate import evaluate
from dallekit.models.clip import load_clip
from dallekit.sample import SampleOptions, sample
from dallekit.synthetic import COLORS, SHAPES
from dallekit.train import split_shards, train_transformer
from dallekit.train_clip import train_clip
from dallekit.train_dvae import train_dvae


@dataclass
class DemoConfig:
    """Size of the demo run."""

    out: str = "runs/demo"  # the run folder
    quick: bool = False  # a small run for tests
    samples: int | None = None  # generated pairs (default 3000, or 300 with quick)
    seed: int = 0  # makes the generated set reproducible


def write_url_list(path: str, rows: list[dict], server: ShapesServer) -> None:
    """The demo's URL list as CSV, with a few rows that ingest must reject (a repeat, an empty caption)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["url", "caption", "foreground", "shape", "background"])
        writer.writeheader()
        for i, row in enumerate(rows):
            record = {k: v for k, v in row.items() if k != "path"} | {"url": server.url(row["path"])}
            writer.writerow(record)
            if i % 100 == 7:  # a repeated URL
                writer.writerow(record)
            if i % 250 == 11:  # a row with no caption
                writer.writerow(record | {"url": server.url(row["path"]) + "?copy", "caption": ""})


# The shapes differ only in colour, shape, size and a little jitter, so a (grayscale) pHash finds
# most of them within 4 bits of another: the demo checks exact duplicates only.
DEMO_CLEAN = CleanConfig(near_dup_distance=-1)
# No CLIP weights can be fetched offline: the demo scores with a randomly initialised tiny CLIP
# through the same code path and keeps every score without filtering on it.
DEMO_FILTER = FilterConfig(clip_model="dallekit-tiny-clip", clip_pretrained=None, clip_threshold=-1.0)


def demo_prompts(seed: int) -> list[str]:
    """One prompt per foreground/shape pair (24, the 6 zero-shot pairs included), with a seeded background."""
    import random

    rng = random.Random(seed)
    return [f"a {fg} {shape} on a {rng.choice([c for c in COLORS if c != fg])} background" for fg in COLORS for shape in SHAPES]


def run_demo(config: DemoConfig, cluster: ClusterConfig) -> list[dict]:
    """Generate the shapes set, serve it on loopback and run the stages; returns each stage's stats."""
    samples = config.samples or (300 if config.quick else 3000)
    os.makedirs(config.out, exist_ok=True)
    data = make_dataset(samples, seed=config.seed)
    server_file = os.path.join(config.out, "server.json")
    port = json.load(open(server_file))["port"] if os.path.exists(server_file) else 0  # reuse: URLs name the port
    with ShapesServer(data.routes, port=port, max_seconds=3 * 3600) as server:
        with open(server_file, "w") as f:
            json.dump({"port": server.port}, f)
        print(f"demo: serving {len(data.routes)} synthetic images on {server.url('/')}")
        url_list = os.path.join(config.out, "urls.csv")
        write_url_list(url_list, data.rows, server)
        with dask_client(cluster) as client:
            stats = [ingest([url_list], f"{config.out}/ingest", IngestConfig(shard_size=100 if config.quick else 500), client)]
            stats.append(download(f"{config.out}/ingest", f"{config.out}/download", DownloadConfig(threads=32, timeout=5), client))
            print("demo: clean checks exact duplicates only (the shapes are near duplicates of each other by design)")
            stats.append(clean(f"{config.out}/download", f"{config.out}/clean", DEMO_CLEAN, client))
            print("demo: CLIP scores come from a randomly initialised dallekit-tiny-clip (no weights offline); kept, not used to filter")
            stats.append(filter_stage(f"{config.out}/clean", f"{config.out}/filter", DEMO_FILTER, client))
            dvae_dir = Path(config.out) / "dvae"
            options = TrainDVAEConfig(preset="tiny", max_steps=150 if config.quick else None,
                                      checkpoint_every=75 if config.quick else 300,
                                      resume=(dvae_dir / "checkpoint" / "state.json").exists())
            metrics = train_dvae(f"{config.out}/filter", str(dvae_dir), options)
            grids = sorted(dvae_dir.glob("recon_step*.png"))
            if metrics:
                print(f"demo: dVAE held-out PSNR {metrics['val_psnr']:.1f} dB, {metrics['codes_used']:.0%} of codes used")
            print(f"demo: reconstruction grid (originals above, reconstructions below): {grids[-1]}")
            # a BPE trained on the demo's captions: a small vocabulary keeps the transformer's text head small
            bpe_dir = Path(config.out) / "bpe"
            if not (bpe_dir / "tokenizer.json").exists():
                captions = [c for p in list_shards(f"{config.out}/filter") for c in read_shard(p, columns=["caption"]).column("caption").to_pylist()]
                train_bpe(captions, str(bpe_dir), vocab_size=256)
            stats.append(encode(f"{config.out}/filter", str(dvae_dir), f"{config.out}/tokens", EncodeConfig(text_tokenizer=str(bpe_dir)), client))
        model_dir = Path(config.out) / "model"
        train_options = TrainConfig(preset="tiny", max_steps=40 if config.quick else 600, batch_size=32, warmup_steps=20 if config.quick else 60,
                                    checkpoint_every=20 if config.quick else 200, num_workers=0, val_fraction=0.15,
                                    resume=(model_dir / "checkpoint" / "state.json").exists())
        metrics = train_transformer(f"{config.out}/tokens", str(model_dir), train_options)
        if metrics:
            print(f"demo: transformer step {metrics['step']}: loss {metrics['loss']:.3f} (image {metrics['image_loss']:.3f})"
                  + (f", validation image loss {metrics['val_image_loss']:.3f}" if "val_image_loss" in metrics else ""))
        clip_dir = Path(config.out) / "clip"
        if not (clip_dir / "open_clip_model.safetensors").exists():
            train_clip(f"{config.out}/filter", str(clip_dir), TrainClipConfig(max_steps=60 if config.quick else 300))
        print(f"demo: reranking with the CLIP trained on the demo's own pairs ({clip_dir})")
        scorer = load_clip("dallekit-tiny-clip", None, checkpoint=str(clip_dir))
        sample(str(model_dir), str(dvae_dir), demo_prompts(config.seed), f"{config.out}/samples",
               SampleOptions(n=8 if config.quick else 16, keep=4, seed=config.seed), scorer)
        print(f"demo: sample grids per prompt (best by CLIP first) in {config.out}/samples/")
        token_paths = list_shards(f"{config.out}/tokens")
        _, val_paths = split_shards(token_paths, train_options.val_fraction, train_options.seed)
        results = evaluate(str(model_dir), str(dvae_dir), None, f"{config.out}/eval", scorer, n=8 if config.quick else 16,
                           captions=8 if config.quick else 24, seed=config.seed, paths=val_paths or token_paths)
        print("demo: evaluation on held-out captions: "
              f"validation image loss {results['val_image_loss']:.3f}, CLIP score random {results['clip_score_random']:.3f} "
              f"vs reranked {results['clip_score_reranked']:.3f}"
              + (f", pixel check right: random {results['pixel_right_random']:.0%} vs reranked {results['pixel_right_reranked']:.0%}"
                 if "pixel_right_random" in results else ""))
        print(f"demo: {results['fid_note']}")
    for s in stats:
        print(format_summary(s))
    return stats
