"""The DALL-E transformer's trainer on token Parquet, on top of the shared loop (`training/loop.py`).

One process or torchrun's DDP ranks (shards split across ranks); bf16 autocast where the
device has it; held-out shards for the validation loss; sample images from fixed captions at
each checkpoint. Rank 0 keeps an EMA of the weights, which validation, the checkpoint samples
and the published model use; the published model (`model.safetensors` + `config.json`) is the
checkpoint with the best validation image loss, `checkpoint/` the latest state; `--early-stop`
ends training when that loss stops improving.
"""


from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dallekit.errors import BadInputError
from dallekit.models.transformer import config_dict
from dallekit.models.weights import autocast, autocast_dtype
from dallekit.progress import progress
from dallekit.training.loop import (
    EMA,
    MetricsLog,
    default_peak_flops,
    learning_rate,
    load_checkpoint,
    publish_model,
    save_checkpoint,
    set_learning_rate,
    tensorboard_writer,
)


def split_shards(paths: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out a seeded fraction of the shards (at least one when the fraction is positive and there are two)."""
    if val_fraction <= 0 or len(paths) < 2:
        return paths, []
    order = list(paths)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(paths) * val_fraction))
    val = set(order[:n_val])
    return [p for p in paths if p not in val], [p for p in paths if p in val]


def model_config_for(metadata: dict, options) -> DalleConfig:  # noqa: F821
    """The transformer config: preset size, vocabularies and grid from the token metadata."""
    from dallekit.models.transformer import dalle_config

    if options.attention_window < 0:
        raise BadInputError(f"--attention-window {options.attention_window}: expected 0 (full attention) or a positive number of rows/columns")
    if options.attention_window and options.sparse_attention:
        raise BadInputError("--attention-window and --sparse-attention are alternatives: pass one")
    overrides = dict(
        text_vocab=metadata["text_tokenizer"]["vocab_size"], image_vocab=metadata["image_tokenizer"]["codebook_size"],
        grid=metadata["image_tokenizer"]["grid"], p_uncond=options.p_uncond, sparse_attention=options.sparse_attention,
        dropout=options.dropout, attention_window=options.attention_window,
    )
    if options.text_len:
        overrides["text_len"] = options.text_len
    return dalle_config(options.preset, **overrides)


@torch.no_grad()
def validation_loss(model, paths: list[str], options, config, device) -> dict:
    """Mean text, image and total loss over the first val_batches batches of the held-out shards."""
    from dallekit.tokenize.tokens import TokenBatches

    model.eval()
    source = TokenBatches(paths, config.text_len, config.pad_base, options.batch_size, shuffle=False, loop=False)
    totals, n = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}, 0
    amp_dtype = autocast_dtype(device, options.dtype)
    for _, text, image in source.batches():
        with autocast(device, amp_dtype):
            out = model(torch.from_numpy(text).to(device), torch.from_numpy(image).to(device), return_loss=True)
        for k in totals:
            totals[k] += out[k].item()
        n += 1
        if n == options.val_batches:
            break
    model.train()
    return {f"val_{k}": v / max(n, 1) for k, v in totals.items()} | {"val_bits_per_image_token": totals["image_loss"] / max(n, 1) / math.log(2)}


def _start_processes(options) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins torchrun's process group when launched by it."""
    from dallekit.models.weights import pick_device

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(options.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _check_resumable(out: Path, config) -> None:
    """A resumed run must continue the same model: bad input if the folder's model has another shape."""
    if not (out / "config.json").exists():
        return
    saved = json.loads((out / "config.json").read_text())
    for key in ("text_vocab", "image_vocab", "grid", "text_len", "n_layer", "n_embd"):
        if saved.get(key) != getattr(config, key):
            raise BadInputError(f"--resume: {out} holds a model with {key}={saved.get(key)}, these tokens and options give {getattr(config, key)}")


@dataclass
class _Best:
    """The best validation image loss so far, its step, and the evaluations since it last improved (kept in the checkpoint)."""

    step: int | None = None
    val_image_loss: float | None = None
    stale: int = 0

    def judge(self, step: int, loss: float) -> bool:
        """Count one evaluation; True when it is the best so far (the first always is; a NaN best is beaten by anything)."""
        if self.step is None or loss < self.val_image_loss or math.isnan(self.val_image_loss):
            self.step, self.val_image_loss, self.stale = step, loss, 0
            return True
        self.stale += 1
        return False

    def stopped(self, patience: int) -> bool:
        """Whether `patience` evaluations (0: never) have passed without an improvement."""
        return 0 < patience <= self.stale

    def summary(self) -> dict:
        """`best_step` and `best_val_image_loss`, for config.json and the returned metrics."""
        return {"best_step": self.step, "best_val_image_loss": self.val_image_loss}


class _Trainer:
    """The transformer, its optimizer, loss scaler and (rank 0) EMA on one rank, resumed from `out` with --resume."""

    def __init__(self, config, options, device: torch.device, out: Path, world: int, rank: int):
        from dallekit.models.transformer import DalleTransformer

        self.options, self.device, self.distributed = options, device, world > 1
        self.model = DalleTransformer(config).to(device)
        self.optimizer = self.model.configure_optimizers(options.weight_decay, options.lr, (0.9, options.beta2), device.type)
        self.amp_dtype = autocast_dtype(device, options.dtype)  # None: fp32
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)  # fp16 needs loss scaling
        self.ema = EMA(self.model, options.ema_decay) if options.ema_decay and rank == 0 else None  # only rank 0 evaluates
        self.start, self.best = 0, _Best()
        if options.resume:
            restored = load_checkpoint(out, self.model, self.optimizer, ema=self.ema)
            if restored is None:
                raise BadInputError(f"--resume: no checkpoint in {out}")
            self.start, self.best = restored["step"], _Best(**restored["extra"].get("best", {}))
            if restored["extra"].get("scaler"):
                self.scaler.load_state_dict(restored["extra"]["scaler"])
            if self.ema is not None and not self.ema.updates:  # a checkpoint without an average: start one from its weights
                self.ema = EMA(self.model, options.ema_decay)
        if options.compile:
            self.model.compile()  # in place: the compiled forward computes the loss too
        self.train_model = self.model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)

    def step(self, batches, caption_rng: torch.Generator) -> tuple[dict[str, float], int, float]:
        """One optimizer step over grad_accum micro-batches: (mean losses, epoch, gradient norm)."""
        options, parts = self.options, {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
        for micro in range(options.grad_accum):
            epoch, text, image = next(batches)
            text = self.model.drop_captions(text, caption_rng).to(self.device, non_blocking=True)
            image = image.to(self.device, non_blocking=True)
            sync = not self.distributed or micro == options.grad_accum - 1
            context = self.train_model.no_sync() if not sync else contextlib.nullcontext()
            with context, autocast(self.device, self.amp_dtype):
                out = self.train_model(text, image, return_loss=True)
                self.scaler.scale(out["loss"] / options.grad_accum).backward()
            for k in parts:
                parts[k] += out[k].item() / options.grad_accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), options.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)  # the unwrapped model: DDP's wrapper holds the same parameters
        return parts, epoch, float(grad_norm)

    def averaged(self):
        """A context in which the model holds the EMA weights (its own without an EMA)."""
        return self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()


class _Logs:
    """Rank 0's metrics, TensorBoard, checkpoint samples, checkpoints and the published best model, at their intervals."""

    def __init__(self, trainer: _Trainer, out: Path, paths: tuple[list[str], list[str]], metadata: dict, tokens_per_step: int):
        options, resume_step = trainer.options, trainer.start if trainer.options.resume else None
        self.trainer, self.out, self.metadata, self.tokens_per_step = trainer, out, metadata, tokens_per_step
        self.train_paths, self.val_paths = paths
        self.metrics = MetricsLog(out / "metrics.jsonl", resume_step=resume_step)
        self.samples = MetricsLog(out / "checkpoint_samples.jsonl", resume_step=resume_step)
        self.captions = sample_caption_tokens(self.val_paths or self.train_paths, options.checkpoint_samples)
        self.board = tensorboard_writer(out, options.tensorboard)
        self.peak = options.peak_flops or default_peak_flops(trainer.device)
        self.flops_per_token = trainer.model.flops_per_token()
        self.last_time, self.record = time.time(), {}

    def after(self, done: int, parts: dict, lr: float, grad_norm: float, epoch: int) -> dict:
        """Log step `done` when due, then checkpoint when due; the latest record."""
        options = self.trainer.options
        if done % options.log_every == 0 or done == options.max_steps:
            now = time.time()
            steps = options.log_every if done % options.log_every == 0 else done % options.log_every
            tokens_per_s = self.tokens_per_step * steps / max(now - self.last_time, 1e-9)
            self.last_time = now
            self.record = {"step": done, **parts, "lr": lr, "grad_norm": grad_norm, "epoch": epoch, "tokens_per_s": tokens_per_s,
                           "mfu": self.flops_per_token * tokens_per_s / self.peak if self.peak else None}
        if done % options.checkpoint_every == 0 or done == options.max_steps:
            self.checkpoint(done, epoch)
        elif self.record.get("step") == done:
            self.metrics.write(self.record)
            self.board(self.record)
        return self.record

    def checkpoint(self, done: int, epoch: int) -> None:
        """Validate and sample with the EMA weights, publish them when best, then save the latest state to checkpoint/."""
        trainer, options, model = self.trainer, self.trainer.options, self.trainer.model
        improved = True  # without validation the latest is published
        with trainer.averaged():
            if self.val_paths:
                base = self.record if self.record.get("step") == done else {"step": done}
                self.record = base | validation_loss(model, self.val_paths, options, model.config, trainer.device)
                improved = trainer.best.judge(done, self.record["val_image_loss"])
                if trainer.best.stopped(options.early_stop):
                    self.record["early_stopped"] = True
            self.metrics.write(self.record)  # before the checkpoint: a resume drops later lines
            self.board(self.record)
            for line in checkpoint_samples(model, self.captions, done, options.seed):
                self.samples.write(line)
        if improved:
            published = {"tokens": self.metadata, "step": done, "ema_decay": options.ema_decay} | trainer.best.summary()
            publish_model(self.out, model, config_dict(model.config) | published, trainer.ema)
        scaler = trainer.scaler
        save_checkpoint(self.out, model, trainer.optimizer, done,
                        {"epoch": epoch, "scaler": scaler.state_dict() if scaler.is_enabled() else None, "best": asdict(trainer.best)},
                        ema=trainer.ema)


def _agreed_stop(trainer: _Trainer, done: int, val_paths: list[str]) -> bool:
    """Whether every rank stops after step `done`: rank 0's early-stop verdict, broadcast at checkpoints."""
    options = trainer.options
    if not options.early_stop or not val_paths or (done % options.checkpoint_every and done != options.max_steps):
        return False
    stop = trainer.best.stopped(options.early_stop)
    if trainer.distributed:
        import torch.distributed as dist

        flag = torch.tensor([float(stop)], device=trainer.device)
        dist.broadcast(flag, src=0)  # only rank 0 validates
        stop = bool(flag.item())
    return stop


def _train_steps(trainer: _Trainer, batches, caption_rng: torch.Generator, logs: _Logs | None, val_paths: list[str]) -> dict:
    """The optimizer steps from the trainer's start to max_steps or an early stop; the last logged record."""
    options, last = trainer.options, {}
    bar = progress(total=options.max_steps, initial=trainer.start, desc="train", unit="step", disable=logs is None)
    try:
        for step in range(trainer.start, options.max_steps):
            lr = learning_rate(step, options.max_steps, options.lr, options.min_lr, options.warmup_steps)
            set_learning_rate(trainer.optimizer, lr)
            parts, epoch, grad_norm = trainer.step(batches, caption_rng)
            bar.update(1)
            if logs is not None:
                last = logs.after(step + 1, parts, lr, grad_norm, epoch) or last
                if last.get("step") == step + 1 and "loss" in last:
                    bar.set_postfix(loss=f"{parts['loss']:.3f}", img=f"{parts['image_loss']:.3f}")
            if _agreed_stop(trainer, step + 1, val_paths):
                bar.set_postfix(stopped=f"no better validation image loss since step {trainer.best.step}")
                return last | {"step": step + 1, "early_stopped": True}
        return last
    finally:
        bar.close()


def train_transformer(tokens_dir: str, out_dir: str, options) -> dict:
    """Train the DALL-E transformer on token Parquet; returns the last logged metrics with the best step and its validation image loss."""
    from dallekit.io import list_shards
    from dallekit.tokenize.tokens import TokenBatches, check_hflip_column, check_token_files, token_loader

    rank, world, device = _start_processes(options)
    paths = list_shards(tokens_dir)
    metadata = check_token_files(paths + (list_shards(options.val) if options.val else []))
    train_paths, val_paths = (paths, list_shards(options.val)) if options.val else split_shards(paths, options.val_fraction, options.seed)
    if options.early_stop and not val_paths:
        raise BadInputError(f"--early-stop {options.early_stop}: needs validation shards (--val DIR, or --val-fraction > 0 and two or more shards)")
    if options.hflip:
        check_hflip_column(tokens_dir, train_paths)
    config = model_config_for(metadata, options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if options.resume:
        _check_resumable(out, config)
    torch.manual_seed(options.seed + rank)
    random.seed(options.seed)
    if options.deterministic:
        torch.use_deterministic_algorithms(True)
    trainer = _Trainer(config, options, device, out, world, rank)
    if trainer.best.stopped(options.early_stop) and val_paths:  # a resume of a run that stopped early: nothing to do
        last = {"step": trainer.start, "early_stopped": True}
    else:
        start = trainer.start
        source = TokenBatches(train_paths, config.text_len, config.pad_base, options.batch_size, options.seed, options.shuffle_buffer, rank, world,
                              hflip=options.hflip)
        batches = iter(token_loader(source, options.num_workers, start_batch=start * options.grad_accum, pin_memory=device.type == "cuda"))
        caption_rng = torch.Generator().manual_seed(options.seed * 7919 + rank)
        for _ in range(start * options.grad_accum):  # the dropout draws of the batches already trained on
            torch.rand(options.batch_size, generator=caption_rng)
        tokens_per_step = options.batch_size * options.grad_accum * world * config.seq_len
        logs = _Logs(trainer, out, (train_paths, val_paths), metadata, tokens_per_step) if rank == 0 else None
        last = _train_steps(trainer, batches, caption_rng, logs, val_paths)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return last | (trainer.best.summary() if val_paths else {})


def sample_caption_tokens(paths: list[str], count: int) -> list[tuple[str, list[int]]]:
    """The first `count` distinct (caption, text tokens) of some token shards: what checkpoints are sampled for."""
    import pyarrow.parquet as pq

    found: dict[str, list[int]] = {}
    for path in paths:
        if len(found) >= count:
            break
        table = pq.read_table(path, columns=["caption", "text_tokens"])
        for caption, tokens in zip(table.column("caption").to_pylist(), table.column("text_tokens").to_pylist()):
            if len(found) < count:
                found.setdefault(caption, tokens)
    return list(found.items())


@torch.no_grad()
def checkpoint_samples(model, captions: list[tuple[str, list[int]]], step: int, seed: int, per_caption: int = 2) -> list[dict]:
    """Image tokens sampled for fixed captions at a checkpoint (decode them with the dVAE to watch training progress)."""
    if not captions:
        return []
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed * 100_003 + step)  # its own generator: training's RNG streams stay untouched
    device = next(model.parameters()).device
    text = model.pad_text([tokens for _, tokens in captions for _ in range(per_caption)]).to(device)
    codes = model.generate(text, generator=generator).cpu().tolist()
    model.train(was_training)
    return [{"step": step, "caption": captions[i // per_caption][0], "image_tokens": c} for i, c in enumerate(codes)]
