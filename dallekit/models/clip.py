"""CLIP through open_clip: one loader for pretrained tags, local checkpoints and random weights; scoring.

A local checkpoint is a folder in open_clip's own layout (`open_clip_config.json` with
`model_cfg` and `preprocess_cfg`, weights in `open_clip_model.safetensors`), loaded with
open_clip's `local-dir:` schema, or a `.safetensors` file for a named model. Pickled weights
are refused. Small configs shipped in `clip_configs/` are registered with open_clip, so a tiny
model has a name like any other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dallekit.config import BadInputError
from dallekit.models.weights import pick_device

CONFIG_DIR = Path(__file__).with_name("clip_configs")
WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"
RANDOM_INIT_SEED = 0
_CACHE: dict[tuple, "ClipScorer"] = {}  # one model per worker process, whatever the number of tasks


def register_configs() -> None:
    """Make dallekit's small CLIP configs known to open_clip by name."""
    import open_clip

    for path in sorted(CONFIG_DIR.glob("*.json")):
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)


@dataclass
class ClipScorer:
    """An open_clip model with its preprocessing and tokenizer, ready to score image-caption pairs."""

    model: Any
    preprocess: Any
    tokenizer: Any
    device: torch.device

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        """Unit-norm image embeddings (B, D) of PIL images."""
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, H, W)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            features = self.model.encode_image(pixels)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, D) of captions."""
        tokens = self.tokenizer(captions).to(self.device)  # (B, context_length)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def score(self, images: list, captions: list[str]) -> np.ndarray:
        """Cosine similarity (B,) of each image with its caption."""
        return (self.embed_images(images) * self.embed_texts(captions)).sum(-1).cpu().numpy()


def load_clip(model_name: str, pretrained: str | None = None, checkpoint: str | None = None, device: str = "auto") -> ClipScorer:
    """Build an open_clip model from a local checkpoint, a pretrained tag, or random weights (pretrained=None)."""
    import open_clip

    register_configs()
    target = pick_device(device)
    try:
        if checkpoint:
            model, preprocess, name = _from_checkpoint(checkpoint, model_name)
        else:
            name = model_name
            if model_name not in open_clip.list_models():
                raise BadInputError(f"--clip-model {model_name}: not an open_clip model name (see open_clip.list_models())")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)  # random weights, but the same in every worker
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
    except BadInputError:
        raise
    except RuntimeError as err:
        if checkpoint:
            raise BadInputError(f"--clip-checkpoint {checkpoint}: does not fit the model ({str(err).splitlines()[0][:200]})") from None
        raise BadInputError(
            f"cannot get CLIP weights {model_name}/{pretrained} ({str(err).splitlines()[0][:160]}); "
            "pass a local open_clip folder with --clip-checkpoint PATH, or --no-clip"
        ) from None
    model = model.to(target).eval()
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(name), target)


def _from_checkpoint(checkpoint: str, model_name: str):
    import open_clip

    path = Path(checkpoint)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise BadInputError(f"--clip-checkpoint {checkpoint}: expected {CONFIG_NAME} and {WEIGHTS_NAME} in this folder")
        name = f"local-dir:{path.resolve()}"
        model, _, preprocess = open_clip.create_model_and_transforms(name)
        return model, preprocess, name
    if path.is_file():
        if path.suffix != ".safetensors":
            raise BadInputError(f"--clip-checkpoint {checkpoint}: expected a .safetensors file (pickled weights are not loaded)")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path))
        return model, preprocess, model_name
    raise BadInputError(f"--clip-checkpoint {checkpoint}: no such file or folder")


def cached_clip(model_name: str, pretrained: str | None, checkpoint: str | None, device: str = "auto") -> ClipScorer:
    """load_clip, once per process for the same arguments (Dask tasks on a worker share it)."""
    key = (model_name, pretrained, checkpoint and os.path.abspath(checkpoint), device)
    if key not in _CACHE:
        _CACHE[key] = load_clip(model_name, pretrained, checkpoint, device)
    return _CACHE[key]


def save_clip(scorer_or_model: Any, model_name: str, out_dir: str) -> Path:
    """Save a CLIP in open_clip's local-dir layout: JSON config and safetensors weights."""
    import open_clip
    from safetensors.torch import save_file

    register_configs()
    model = getattr(scorer_or_model, "model", scorer_or_model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise BadInputError(f"{model_name}: no open_clip config to save with the weights")
    preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    (out / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    save_file(state, str(out / (WEIGHTS_NAME + ".tmp")))
    os.replace(out / (WEIGHTS_NAME + ".tmp"), out / WEIGHTS_NAME)  # last and atomic: the weights mark a finished save
    return out
