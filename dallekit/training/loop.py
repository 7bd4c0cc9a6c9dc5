"""Training-loop helpers shared by the trainers: schedules, safetensors checkpoints with exact resume, metrics.

A run folder holds the latest model as `model.safetensors` + `config.json` (what other commands
load) and the trainer's state in `checkpoint/` (optimizer tensors and RNG state in safetensors,
step and loader position in JSON). `checkpoint/` is replaced by renaming a complete copy, so a
killed run resumes from the last complete checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dallekit.errors import BadInputError
from dallekit.io import write_json_atomic
from dallekit.models.weights import save_model


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from `start` at step 0 to `end` at step `total` (and after)."""
    frac = min(max(step, 0) / max(total, 1), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))


def learning_rate(step: int, total: int, peak: float, end: float, warmup: int = 0) -> float:
    """The trainers' schedule: linear warm-up over `warmup` steps to `peak`, then cosine down to `end` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, total - warmup, peak, end)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def save_checkpoint(out_dir: str | Path, model, optimizer: torch.optim.Optimizer, step: int, extra: dict, ema: EMA | None = None) -> None:
    """Model, optimizer, EMA weights, RNG states, step and `extra` (e.g. loader position), replacing checkpoint/ atomically.

    The model folder's published weights (`publish_model`) are the trainer's choice: the latest,
    or the best by validation.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp, final, old = out / "checkpoint.tmp", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, dict] = {}
    for index, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    if ema is not None:
        tensors |= {f"ema.{k}": v.contiguous() for k, v in ema.shadow.items()}
    save_file(tensors, str(tmp / "state.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    write_json_atomic({
        "step": step, "param_groups": opt["param_groups"], "scalars": scalars,
        "python_rng": _encode_random_state(random.getstate()), "extra": extra, "saved_at": time.time(),
        "ema_updates": ema.updates if ema is not None else None,
    }, str(tmp / "state.json"))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint_folder(out: Path) -> Path | None:
    """The checkpoint a resume reads: checkpoint/, or checkpoint.old/ when a save was cut short."""
    return next((p for p in (out / "checkpoint", out / "checkpoint.old") if (p / "state.json").is_file()), None)


def check_resume_settings(out_dir: str | Path, key: str, settings: dict) -> None:
    """Bad input, before any weight is loaded, unless out_dir's checkpoint was trained with these settings (its extra[key]), naming what differs."""
    folder = _checkpoint_folder(Path(out_dir))
    if folder is None:
        raise BadInputError(f"--resume: no checkpoint in {out_dir}")
    trained = json.loads((folder / "state.json").read_text()).get("extra", {}).get(key)
    if not isinstance(trained, dict):
        raise BadInputError(f"--resume: {out_dir} holds a checkpoint of another kind of model (no {key!r} settings in it); give another --out")
    differ = [k for k in settings if trained.get(k) != settings[k]]
    if differ:
        changes = "; ".join(f"{k} {trained.get(k)!r} -> {settings[k]!r}" for k in differ)
        raise BadInputError(f"--resume: {out_dir} was trained with another preset or options ({changes}); "
                            "give the same ones to resume it, or another --out")


def load_checkpoint(out_dir: str | Path, model, optimizer: torch.optim.Optimizer, ema: EMA | None = None) -> dict | None:
    """Restore model, optimizer, EMA and RNG states from out_dir/checkpoint; returns {step, extra} or None."""
    folder = _checkpoint_folder(Path(out_dir))
    if folder is None:
        return None
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    _match_param_layouts(optimizer)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    random.setstate(_decode_random_state(meta["python_rng"]))
    if ema is not None:
        ema.load({k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}, meta.get("ema_updates"))
    return {"step": meta["step"], "extra": meta["extra"]}


def publish_model(out_dir: str | Path, model, config: dict, ema: EMA | None = None) -> None:
    """Write the model folder other commands load (`model.safetensors` + `config.json`): the EMA weights when there are some."""
    if ema is None:
        save_model(out_dir, model, config)
        return
    with ema.applied(model):
        save_model(out_dir, model, config)


class EMA:
    """Exponential moving average of a model's floating-point weights (fp32 shadow), for evaluation and publishing.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over n updates, so early evaluations are
    not dominated by the initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards the model's current weights."""
        self.updates += 1
        rate = 1 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in model.state_dict().items():
            if key in self.shadow:
                self.shadow[key].lerp_(value.detach().float(), rate)

    def load(self, shadow: dict[str, torch.Tensor], updates: int | None) -> None:
        """Restore a checkpoint's average (keys it lacks keep the current weights)."""
        for key, value in shadow.items():
            if key in self.shadow:
                self.shadow[key] = value.float().to(self.shadow[key].device)
        self.updates = updates or 0

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """Within the block the model holds the averaged weights; its own come back after."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict({k: v.to(saved[k].dtype) for k, v in self.shadow.items()}, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(saved, strict=False)


def _match_param_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each restored moment its parameter's memory layout (channels-last convolutions).

    The checkpoint stores them contiguous; fused AdamW walks param, grad and moments as flat
    memory, so a moment in another layout than its parameter would update the wrong elements.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _encode_random_state(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _decode_random_state(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


class MetricsLog:
    """Append-only JSONL metrics, one line per logged step; a resumed run drops lines past its checkpoint."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            lines = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
            self.path.write_text("".join(l + "\n" for l in lines))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        """Append one record (must carry `step`)."""
        with self.path.open("a") as f:
            f.write(json.dumps({k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics JSONL file."""
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}


def default_peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of a known GPU, or None (no MFU on the CPU unless --peak-flops is given)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def tensorboard_writer(out: Path, enabled: bool):
    """A function that writes a metrics record to TensorBoard, or does nothing."""
    if not enabled:
        return lambda record: None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BadInputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    writer = SummaryWriter(str(out / "tensorboard"))

    def write(record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, record["step"])
        writer.flush()

    return write
