"""`dallekit train-dvae`: train a dVAE on the image bytes of filtered shards.

Images stream from the shards in a seeded order (shard order shuffled per epoch, then a
bounded shuffle buffer) and are decoded, resized and centre-cropped on the fly; images whose
uid hashes into the held-out percent never train and measure reconstruction PSNR (with the
hard, argmax codes the transformer will see) and codebook usage. Checkpoints (safetensors +
JSON) hold the loader position and RNG states, so --resume continues exactly.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dallekit.config import TrainDVAEConfig
from dallekit.errors import BadInputError
from dallekit.images import UndecodableImage, load_square, save_image_grid, undecodable_reason
from dallekit.io import check_columns, list_shards, read_shard
from dallekit.models.dvae import DVAE, DVAEConfig, dvae_config, save_dvae_config
from dallekit.models.weights import adamw, autocast, autocast_dtype, pick_device
from dallekit.progress import progress
from dallekit.training.loop import (
    MetricsLog,
    check_resume_settings,
    cosine,
    learning_rate,
    load_checkpoint,
    publish_model,
    save_checkpoint,
    set_learning_rate,
)


def is_held_out(uid: str, percent: int) -> bool:
    """Whether a uid belongs to the held-out split (stable across runs and shardings)."""
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=4).digest(), "little") % 100 < percent


class ImageStream:
    """Seeded, resumable stream of training images (uint8 S x S x 3) from stage shards."""

    def __init__(self, paths: list[str], size: int, seed: int, buffer: int, val_percent: int):
        self.paths, self.size, self.seed, self.buffer, self.val_percent = paths, size, seed, buffer, val_percent
        self.skipped: Counter[str] = Counter()  # images this process did not decode, by reason (image_too_large, undecodable)

    def _raw(self, epoch: int) -> Iterator[bytes]:
        """Image bytes of one epoch in a deterministic order; decoding happens later, only for what is used."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(self.paths)
        rng.shuffle(order)
        buffer: list[bytes] = []
        for path in order:
            table = read_shard(path, columns=["uid", "jpg"])
            for uid, data in zip(table.column("uid").to_pylist(), table.column("jpg").to_pylist()):
                if data is None or is_held_out(uid, self.val_percent):
                    continue
                buffer.append(data)
                if len(buffer) >= self.buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def batches(self, batch_size: int, epoch: int = 0, consumed: int = 0) -> Iterator[tuple[np.ndarray, int, int]]:
        """Yield (images (B, S, S, 3), epoch, images consumed in that epoch after this batch), forever."""
        batch: list[np.ndarray] = []
        while True:
            seen = 0
            for data in self._raw(epoch):
                seen += 1
                if seen <= consumed:  # resuming: skip what the checkpointed run already used
                    continue
                try:
                    batch.append(load_square(data, self.size))
                except UndecodableImage as err:  # load_square reads the header first: over 64 Mpx is skipped undecoded
                    self.skipped[undecodable_reason(err)] += 1
                    continue
                if len(batch) == batch_size:
                    yield np.stack(batch), epoch, seen
                    batch = []
            if seen == 0:
                raise BadInputError("no training images: every image is held out or missing")
            epoch, consumed = epoch + 1, 0


def held_out_images(paths: list[str], size: int, percent: int, limit: int = 256) -> np.ndarray:
    """Up to `limit` decoded held-out images, in shard order."""
    images = []
    for path in paths:
        table = read_shard(path, columns=["uid", "jpg"])
        for uid, data in zip(table.column("uid").to_pylist(), table.column("jpg").to_pylist()):
            if data is not None and is_held_out(uid, percent):
                try:
                    images.append(load_square(data, size))
                except UndecodableImage:
                    continue
                if len(images) == limit:
                    return np.stack(images)
    if not images:
        raise BadInputError(f"no held-out images: raise --val-percent ({percent}) or add images")
    return np.stack(images)


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1]."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def evaluate(model: DVAE, images: np.ndarray, device: torch.device) -> tuple[dict, np.ndarray]:
    """PSNR of hard-code reconstructions and codebook usage on held-out images; returns metrics and reconstructions."""
    model.eval()
    x = to_tensor(images, device)
    codes = torch.cat([model.encode(x[i : i + 64]) for i in range(0, len(x), 64)])  # (N, G, G)
    rec = torch.cat([model.decode(codes[i : i + 64]) for i in range(0, len(codes), 64)])  # (N, 3, S, S)
    model.train()
    mse = ((rec - x) ** 2).mean().item()
    counts = torch.bincount(codes.flatten(), minlength=model.config.codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    metrics = {"val_psnr": 10 * math.log10(1 / max(mse, 1e-10)), "perplexity": math.exp(entropy), "codes_used": (counts > 0).float().mean().item()}
    return metrics, (rec.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def build_config(options: TrainDVAEConfig) -> DVAEConfig:
    """The preset with the run's overrides; the temperature and KL schedules keep their share of a changed max_steps."""
    overrides = {k: v for k, v in (("max_steps", options.max_steps), ("batch_size", options.batch_size), ("recon_loss", options.recon_loss)) if v is not None}
    preset = dvae_config(options.preset)
    if options.max_steps is not None and options.max_steps != preset.max_steps:
        scale = options.max_steps / preset.max_steps
        overrides |= {"temp_anneal_steps": max(1, round(preset.temp_anneal_steps * scale)),
                      "kl_warmup_steps": max(1, round(preset.kl_warmup_steps * scale))}
    return dvae_config(options.preset, **overrides)


def train_dvae(input_dir: str, out_dir: str, options: TrainDVAEConfig) -> dict:
    """Train a dVAE; returns the last evaluation metrics, and images_skipped_<reason> counts when images were not decoded."""
    paths = list_shards(input_dir)
    check_columns(paths, {"uid", "jpg"}, "image shards from `dallekit filter`")
    config = build_config(options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(options.device)
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    model = DVAE(config).to(device, memory_format=torch.channels_last)  # channels-last convolutions run ~1.5x faster on CPU
    optimizer = adamw(model.parameters(), device, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    start, epoch, consumed = 0, 0, 0
    if options.resume:
        check_resume_settings(out_dir, "dvae", asdict(config))  # before the weights: another preset's would not fit
        restored = load_checkpoint(out, model, optimizer)
        start, epoch, consumed = restored["step"], restored["extra"]["epoch"], restored["extra"]["consumed"]
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if options.resume else None)
    stream = ImageStream(paths, config.image_size, options.seed, options.shuffle_buffer, options.val_percent)
    val = held_out_images(paths, config.image_size, options.val_percent)
    batches = stream.batches(config.batch_size, epoch, consumed)
    metrics: dict = {}
    last_time, bar = time.time(), progress(total=config.max_steps, initial=start, desc="train-dvae", unit="step")
    amp_dtype = autocast_dtype(device, options.dtype)  # None: fp32
    for step in range(start, config.max_steps):
        temperature = cosine(step, config.temp_anneal_steps, config.temp_start, config.temp_end)
        kl_weight = config.kl_weight * min(1.0, step / max(config.kl_warmup_steps, 1))
        lr = learning_rate(step, config.max_steps, config.lr, config.lr_end)
        set_learning_rate(optimizer, lr)
        images, epoch, consumed = next(batches)
        with autocast(device, amp_dtype):
            out_step = model(to_tensor(images, device), temperature, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        out_step["loss"].backward()
        optimizer.step()
        bar.update(1)
        done = step + 1
        record = None
        if done % options.log_every == 0 or done == config.max_steps:
            now = time.time()
            record = {"step": done, "loss": out_step["loss"].item(), "recon": out_step["recon"].item(), "kl": out_step["kl"].item(),
                      "temperature": temperature, "kl_weight": kl_weight, "lr": lr, "epoch": epoch,
                      "steps_per_s": options.log_every / max(now - last_time, 1e-9)}
            last_time = now
        if done % options.checkpoint_every == 0 or done == config.max_steps:
            metrics, recon = evaluate(model, val, device)
            n = min(8, len(val))  # originals on top, their reconstructions below
            save_image_grid(list(val[:n]) + list(recon[:n]), out / f"recon_step{done:06d}.png", columns=n)
            log.write((record or {"step": done}) | metrics)  # before the checkpoint: a resume drops later lines
            publish_model(out, model, save_dvae_config(config))
            save_checkpoint(out, model, optimizer, done,
                            {"epoch": epoch, "consumed": consumed, "dvae": asdict(config)})
            bar.set_postfix(psnr=f"{metrics['val_psnr']:.1f}", used=f"{metrics['codes_used']:.2f}")
        elif record:
            log.write(record)
    bar.close()
    return metrics | {f"images_skipped_{reason}": n for reason, n in stream.skipped.items()}
