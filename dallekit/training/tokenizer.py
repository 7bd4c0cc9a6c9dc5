"""`dallekit train-tokenizer` (alias `train-dvae`): one command for either image tokenizer, chosen by preset.

dVAE presets go to `training/dvae.py`. FSQ presets train here, LlamaGen's recipe at a small
scale: L2 reconstruction, a PatchGAN hinge loss switched on after a warm-up, a perceptual
(LPIPS) loss when the user gives VGG16 weights, and an exponential moving average of the
weights that evaluation and the saved model use. The image stream, held-out split, PSNR and
code-usage metrics, checkpoints and exact resume are the dVAE trainer's.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dallekit.config import DVAE_PRESET_NAMES, TrainTokenizerConfig
from dallekit.errors import BadInputError
from dallekit.images import save_image_grid
from dallekit.io import check_columns, list_shards
from dallekit.models.discriminator import DiscriminatorConfig, PatchDiscriminator, hinge_discriminator_loss, hinge_generator_loss
from dallekit.models.fsq import FSQAutoencoder, FSQConfig, fsq_config, save_fsq_config
from dallekit.models.weights import adamw, autocast, autocast_dtype, load_weights, pick_device, read_weights_file
from dallekit.progress import progress
from dallekit.training.dvae import ImageStream, evaluate, held_out_images, to_tensor, train_dvae
from dallekit.training.loop import (
    EMA,
    MetricsLog,
    check_resume_settings,
    learning_rate,
    load_checkpoint,
    publish_model,
    save_checkpoint,
    set_learning_rate,
)


def train_tokenizer(input_dir: str, out_dir: str, options: TrainTokenizerConfig) -> dict:
    """Train the preset's kind of image tokenizer; returns the last evaluation metrics."""
    if options.preset in DVAE_PRESET_NAMES:
        return train_dvae(input_dir, out_dir, options)
    return train_fsq(input_dir, out_dir, options)


def build_fsq_config(options: TrainTokenizerConfig) -> FSQConfig:
    """The preset with the run's overrides; the discriminator's start keeps its share of a changed max_steps."""
    preset = fsq_config(options.preset)
    names = ("max_steps", "batch_size", "levels", "image_size", "ema_decay", "disc_start", "disc_weight")
    overrides = {name: getattr(options, name) for name in names if getattr(options, name) is not None}
    if options.max_steps is not None and options.disc_start is None:
        overrides["disc_start"] = round(preset.disc_start * options.max_steps / preset.max_steps)
    try:
        config = fsq_config(options.preset, **overrides)
        FSQAutoencoder(config)  # the image size and levels must make a grid: ValueError otherwise
    except ValueError as err:
        raise BadInputError(f"--levels/--image-size: {err}") from None
    return config


class FSQTraining(nn.Module):
    """The tokenizer and its discriminator: one module, one optimizer, one checkpoint.

    Each update touches one side: the generator step freezes the discriminator, and the
    discriminator step sees detached reconstructions, so AdamW skips the side without gradients.
    """

    def __init__(self, config: FSQConfig):
        super().__init__()
        self.tokenizer = FSQAutoencoder(config)
        self.discriminator = PatchDiscriminator(DiscriminatorConfig(config.disc_width, config.disc_layers))


def _perceptual(options: TrainTokenizerConfig, device: torch.device):
    """The LPIPS loss from the user's VGG16 weights file, or None."""
    if options.perceptual_weights is None:
        return None
    from dallekit.models.perceptual import load_perceptual_loss

    return load_perceptual_loss(options.perceptual_weights).to(device)


def _init_discriminator(training: FSQTraining, path: str | None) -> None:
    """Start the discriminator from the user's weights file (bad input naming it when it does not fit)."""
    if path is not None:
        load_weights(training.discriminator, read_weights_file(path, "PatchGAN discriminator weights"), path)


def fsq_step(training: FSQTraining, optimizer, x: torch.Tensor, step: int, config: FSQConfig, perceptual, amp_dtype, device) -> dict:
    """One generator update (L2 + perceptual + adversarial after disc_start) and, after disc_start, one discriminator update."""
    adversarial = step >= config.disc_start and config.disc_weight > 0
    with autocast(device, amp_dtype):
        rec, _ = training.tokenizer(x)  # (B, 3, S, S) in [0, 1], unclamped
        l2 = F.mse_loss(rec, x)
        loss, parts = l2, {"l2": l2.item()}
        if perceptual is not None:
            p_loss = perceptual(rec * 2 - 1, x * 2 - 1)
            loss, parts["perceptual"] = loss + config.perceptual_weight * p_loss, p_loss.item()
        if adversarial:
            training.discriminator.requires_grad_(False)
            g_loss = hinge_generator_loss(training.discriminator(rec * 2 - 1))
            loss, parts["g_loss"] = loss + config.disc_weight * g_loss, g_loss.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if adversarial:
        training.discriminator.requires_grad_(True)
        with autocast(device, amp_dtype):
            d_loss = hinge_discriminator_loss(training.discriminator(x * 2 - 1), training.discriminator(rec.detach() * 2 - 1))
        optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        optimizer.step()
        parts["d_loss"] = d_loss.item()
    return {"loss": loss.item()} | parts


def flip_half(images: np.ndarray, rng: random.Random) -> np.ndarray:
    """Mirror each image (B, S, S, 3) left-right with probability 1/2."""
    flips = np.array([rng.random() < 0.5 for _ in range(len(images))])
    return np.where(flips[:, None, None, None], images[:, :, ::-1], images)


def resume_settings(config: FSQConfig, options: TrainTokenizerConfig) -> dict:
    """What a checkpoint records and --resume must find unchanged: the architecture and schedule, and --hflip (the images seen)."""
    return asdict(config) | {"hflip": options.hflip}


def _start(options: TrainTokenizerConfig, config: FSQConfig, out: Path, device: torch.device):
    """(training module, optimizer, EMA, start step, epoch, images consumed), restored with --resume."""
    torch.manual_seed(options.seed)
    random.seed(options.seed)
    training = FSQTraining(config).to(device, memory_format=torch.channels_last)  # channels-last convolutions run faster on CPU
    _init_discriminator(training, options.discriminator_init)
    optimizer = adamw(training.parameters(), device, lr=config.lr, betas=(0.5, 0.9), eps=1e-8, weight_decay=config.weight_decay)
    ema = EMA(training.tokenizer, config.ema_decay) if config.ema_decay > 0 else None
    if not options.resume:
        return training, optimizer, ema, 0, 0, 0
    check_resume_settings(out, "fsq", resume_settings(config, options))
    restored = load_checkpoint(out, training, optimizer, ema)
    return training, optimizer, ema, restored["step"], restored["extra"]["epoch"], restored["extra"]["consumed"]


def train_fsq(input_dir: str, out_dir: str, options: TrainTokenizerConfig) -> dict:
    """Train an FSQ tokenizer; returns the last evaluation metrics (EMA weights), and images_skipped_<reason> counts."""
    paths = list_shards(input_dir)
    check_columns(paths, {"uid", "jpg"}, "image shards from `dallekit filter`")
    config = build_fsq_config(options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(options.device)
    perceptual = _perceptual(options, device)
    training, optimizer, ema, start, epoch, consumed = _start(options, config, out, device)
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if options.resume else None)
    stream = ImageStream(paths, config.image_size, options.seed, options.shuffle_buffer, options.val_percent)
    val = held_out_images(paths, config.image_size, options.val_percent)
    batches = stream.batches(config.batch_size, epoch, consumed)
    amp_dtype = autocast_dtype(device, options.dtype)  # None: fp32
    metrics, settings = {}, resume_settings(config, options)
    last_time, bar = time.time(), progress(total=config.max_steps, initial=start, desc="train-tokenizer", unit="step")
    for step in range(start, config.max_steps):
        lr = learning_rate(step, config.max_steps, config.lr, config.lr_end, config.warmup_steps)
        set_learning_rate(optimizer, lr)
        images, epoch, consumed = next(batches)
        if options.hflip:
            images = flip_half(images, random.Random(options.seed * 1_000_003 + step))  # per step: a resume flips the same images
        parts = fsq_step(training, optimizer, to_tensor(images, device), step, config, perceptual, amp_dtype, device)
        if ema is not None:
            ema.update(training.tokenizer)
        bar.update(1)
        done, record = step + 1, None
        position = {"epoch": epoch, "consumed": consumed, "fsq": settings}
        if done % options.log_every == 0 or done == config.max_steps:
            now = time.time()
            record = {"step": done, **parts, "lr": lr, "epoch": epoch, "steps_per_s": options.log_every / max(now - last_time, 1e-9)}
            last_time = now
        if done % options.checkpoint_every == 0 or done == config.max_steps:
            metrics = _checkpoint(training, optimizer, ema, config, val, out, done, record, position, log, device)
            bar.set_postfix(psnr=f"{metrics['val_psnr']:.1f}", used=f"{metrics['codes_used']:.2f}")
        elif record:
            log.write(record)
    bar.close()
    return metrics | {f"images_skipped_{reason}": n for reason, n in stream.skipped.items()}


def _checkpoint(training: FSQTraining, optimizer, ema: EMA | None, config: FSQConfig, val: np.ndarray, out: Path, done: int,
                record: dict | None, position: dict, log: MetricsLog, device: torch.device) -> dict:
    """Evaluate the (EMA) tokenizer on held-out images, save its grid, log, publish it and checkpoint everything (`position`: the checkpoint's extra)."""
    model = training.tokenizer
    with ema.applied(model) if ema is not None else contextlib.nullcontext():
        metrics, recon = evaluate(model, val, device)
    n = min(8, len(val))  # originals on top, their reconstructions below
    save_image_grid(list(val[:n]) + list(recon[:n]), out / f"recon_step{done:06d}.png", columns=n)
    log.write((record or {"step": done}) | metrics)  # before the checkpoint: a resume drops later lines
    publish_model(out, model, save_fsq_config(config), ema)
    save_checkpoint(out, training, optimizer, done, position, ema)
    return metrics
