"""`dallekit train-clip`: a small open_clip model trained on the pipeline's own kept pairs.

open_clip's contrastive loss (ClipLoss) on (image, caption) pairs streamed from filtered shards.
The result is an open_clip local-dir checkpoint (JSON config + safetensors) that `filter
--clip-checkpoint` and `sample --clip-checkpoint` load: an offline reranker and domain filter
where no pretrained weights can be fetched.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path

import torch

from dallekit.config import TrainClipConfig
from dallekit.errors import BadInputError
from dallekit.images import UndecodableImage, decode_rgb, undecodable_reason
from dallekit.io import check_columns, list_shards, read_shard
from dallekit.models.clip import load_clip, save_clip
from dallekit.models.weights import adamw, autocast, autocast_dtype
from dallekit.progress import progress
from dallekit.training.loop import MetricsLog, learning_rate, set_learning_rate


def pair_batches(paths: list[str], batch_size: int, seed: int, draft: int, skipped: Counter):
    """Endless (RGB images, captions) batches: shard order and rows shuffled per epoch, seeded.

    JPEGs decode at reduced scale down to `draft` px. An image over 64 Mpx by its header, or one
    that does not decode, is skipped and counted in `skipped` by reason.
    """
    epoch = 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(paths)
        rng.shuffle(order)
        images, captions, batches = [], [], 0
        for path in order:
            table = read_shard(path, columns=["jpg", "caption"])
            rows = list(zip(table.column("jpg").to_pylist(), table.column("caption").to_pylist()))
            rng.shuffle(rows)
            for data, caption in rows:
                if data is None or not caption:
                    continue
                try:
                    images.append(decode_rgb(data, draft_size=draft))  # reads the header before it decodes
                except UndecodableImage as err:
                    skipped[undecodable_reason(err)] += 1
                    continue
                captions.append(caption)
                if len(images) == batch_size:
                    batches += 1
                    yield images, captions
                    images, captions = [], []
        if batches == 0:  # else the loop would read the shards forever
            raise BadInputError(f"{len(images)} image-caption pairs, fewer than --batch-size {batch_size}: lower it or add data")
        epoch += 1


def train_clip(filtered_dir: str, out_dir: str, options: TrainClipConfig) -> dict:
    """Train a CLIP on the filtered pairs and save it in open_clip's local-dir layout; returns the last metrics (and images_skipped_<reason> counts)."""
    import open_clip

    paths = list_shards(filtered_dir)
    check_columns(paths, {"jpg", "caption"}, "image shards with captions from `dallekit filter`")
    torch.manual_seed(options.seed)
    scorer = load_clip(options.model, None, device=options.device)  # random weights, the same code path as pretrained
    model, device = scorer.model.train(), scorer.device
    model.visual.to(memory_format=torch.channels_last)  # a ResNet tower's step is ~10% cheaper on the CPU (weights are saved contiguous)
    optimizer = adamw(model.parameters(), device, lr=options.lr, weight_decay=options.weight_decay)
    loss_fn = open_clip.loss.ClipLoss()
    size = model.visual.image_size
    draft = 2 * (size[0] if isinstance(size, (tuple, list)) else size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl")
    skipped: Counter[str] = Counter()
    batches = pair_batches(paths, options.batch_size, options.seed, draft, skipped)
    batches = itertools.chain([next(batches)], batches)  # too little data fails here, before the progress bar
    metrics: dict = {}
    amp_dtype = autocast_dtype(device, options.dtype)  # None: fp32
    for step in progress(range(options.max_steps), desc="train-clip", unit="step"):
        set_learning_rate(optimizer, learning_rate(step, options.max_steps, options.lr, options.lr / 10))
        pictures, captions = next(batches)
        pixels = torch.stack([scorer.preprocess(p) for p in pictures]).to(device, memory_format=torch.channels_last)
        tokens = scorer.tokenizer(captions).to(device)
        with autocast(device, amp_dtype):
            image_features, text_features, logit_scale = model(pixels, tokens)
            loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP caps the temperature at 100
            accuracy = ((image_features @ text_features.T).argmax(-1) == torch.arange(len(captions), device=device)).float().mean()
        if (step + 1) % 25 == 0 or step + 1 == options.max_steps:
            metrics = {"step": step + 1, "loss": loss.item(), "batch_retrieval_accuracy": accuracy.item()}
            log.write(metrics)
    if not metrics:
        raise BadInputError("--max-steps must be at least 1")
    save_clip(model.eval(), options.model, out_dir)
    return metrics | {f"images_skipped_{reason}": n for reason, n in skipped.items()}
