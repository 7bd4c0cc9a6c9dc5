"""CLIP through open_clip: one loader for pretrained tags, local checkpoints and random weights; scoring.

A local checkpoint is a folder in open_clip's own layout (`open_clip_config.json` with
`model_cfg` and `preprocess_cfg`, weights in `open_clip_model.safetensors`), loaded with
open_clip's `local-dir:` schema, or a `.safetensors` file for a named model. Pickled weights
are refused on every path: a local file must be `.safetensors`, and a pretrained tag is
fetched here, as open_clip would fetch it but only as its `.safetensors` file, which is then
handed to open_clip by path (a tag whose weights exist only as a pickle is refused). Small
configs shipped in `clip_configs/` are registered with open_clip, so a tiny model has a name
like any other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from dallekit.errors import BadInputError
from dallekit.models.weights import pick_device

CONFIG_DIR = Path(__file__).with_name("clip_configs")
WEIGHTS_NAME = "open_clip_model.safetensors"
CONFIG_NAME = "open_clip_config.json"
RANDOM_INIT_SEED = 0
# a --clip-pretrained value ending so names a file, never a tag (open_clip's tags have no dots)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".npz", ".npy")
_CACHE: dict[tuple, ClipScorer] = {}  # one model per worker process, whatever the number of tasks


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


@contextlib.contextmanager
def _root_logging_untouched():
    """Undo a handler added to the root logger meanwhile.

    open_clip logs with `logging.info` on the root logger, which installs a stderr handler in a
    process that has none; every library's INFO records (Dask's cluster start and stop) would
    then be printed.
    """
    before = list(logging.root.handlers)
    try:
        yield
    finally:
        for handler in [h for h in logging.root.handlers if h not in before]:
            logging.root.removeHandler(handler)


def load_clip(model_name: str, pretrained: str | None = None, checkpoint: str | None = None, device: str = "auto") -> ClipScorer:
    """Build an open_clip model from a local checkpoint, a pretrained tag, or random weights (pretrained=None)."""
    with _root_logging_untouched():
        return _build_clip(model_name, pretrained, checkpoint, device)


def _build_clip(model_name: str, pretrained: str | None, checkpoint: str | None, device: str) -> ClipScorer:
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
                model, preprocess = _from_pretrained(model_name, pretrained)
    except BadInputError:
        raise
    except SafetensorError as err:
        where = f"--clip-checkpoint {checkpoint}" if checkpoint else f"--clip-pretrained {pretrained}"
        raise BadInputError(f"{where}: not a readable .safetensors file ({str(err).splitlines()[0][:160]})") from None
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as err:
        if checkpoint:  # a config or weights file of the user's that open_clip cannot build or fill
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise BadInputError(f"--clip-checkpoint {checkpoint}: does not fit the model ({reason})") from None
        if not isinstance(err, RuntimeError):
            raise
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
        weights = _safetensors_file(checkpoint, "--clip-checkpoint")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        return model, preprocess, model_name
    raise BadInputError(f"--clip-checkpoint {checkpoint}: no such file or folder")


def _safetensors_file(value: str, option: str) -> str:
    """A local weights file, which must be .safetensors: open_clip torch.loads any other name, and that unpickles."""
    if not value.endswith(".safetensors"):  # open_clip's own test, case and all
        raise BadInputError(f"{option} {value}: expected a .safetensors file (pickled weights are not loaded)")
    if not Path(value).is_file():
        raise BadInputError(f"{option} {value}: no such file")
    return value


def _from_pretrained(model_name: str, pretrained: str | None):
    """A named model with random weights (no pretrained), a local .safetensors, or a pretrained tag's .safetensors."""
    import open_clip

    if not pretrained:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name)
        return model, preprocess
    looks_like_path = os.path.isfile(pretrained) or "/" in pretrained or "\\" in pretrained
    if looks_like_path or pretrained.lower().endswith(WEIGHT_SUFFIXES):
        weights = _safetensors_file(pretrained, "--clip-pretrained")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
        return model, preprocess
    weights, cfg = _tag_weights(model_name, pretrained)
    _safetensors_file(weights, f"--clip-pretrained {pretrained}:")  # what the hub returned is what open_clip opens
    # open_clip takes the tag's preprocessing only when given the tag itself, so pass it along with the file
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=weights, image_mean=cfg.get("mean"), image_std=cfg.get("std"),
        image_interpolation=cfg.get("interpolation"), image_resize_mode=cfg.get("resize_mode"),
    )
    return model, preprocess


def _tag_weights(model_name: str, tag: str) -> tuple[str, dict]:
    """The local .safetensors of a pretrained tag and the tag's config; a tag whose weights are a pickle is refused."""
    from open_clip import pretrained as registry

    cfg = registry.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = ", ".join(registry.list_pretrained_tags_by_model(model_name)) or "none"
        raise BadInputError(f"--clip-pretrained {tag}: not a pretrained tag of {model_name} (its tags: {tags})")
    repo, filename = os.path.split(cfg.get("hf_hub") or "")
    if not (repo and registry.has_hf_hub()):  # open_clip's download_pretrained then takes the tag's file or URL
        source = cfg.get("file") or cfg.get("url") or ""
        if not source.endswith(".safetensors"):
            raise BadInputError(f"--clip-pretrained {tag}: open_clip would load {source or 'nothing'}, not a .safetensors file (pickled weights are not loaded)")
        return registry.download_pretrained(cfg, prefer_hf_hub=False), cfg
    filename = filename or registry.HF_WEIGHTS_NAME
    safe = _safe_alternative(filename, registry.HF_WEIGHTS_NAME, registry.HF_SAFE_WEIGHTS_NAME)
    if not safe.endswith(".safetensors"):
        raise BadInputError(f"--clip-pretrained {tag}: open_clip would load {repo}/{filename}, not a .safetensors file (pickled weights are not loaded)")
    try:
        return registry.hf_hub_download(repo_id=repo, filename=safe), cfg
    except Exception as err:  # noqa: BLE001 - any hub failure is reported; only a missing file means "pickle only"
        if _missing_on_hub(err):
            raise BadInputError(
                f"--clip-pretrained {tag}: {repo} has no {safe}; open_clip would load {filename}, a pickle (pickled weights are not loaded)"
            ) from None
        raise RuntimeError(f"{repo}/{safe}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _safe_alternative(filename: str, pickle_name: str, safe_name: str) -> str:
    """The .safetensors file open_clip 3.3 tries before `filename` on the hub (pretrained._get_safe_alternatives)."""
    if filename == pickle_name:
        return safe_name
    if filename.endswith((".bin", ".pth")):
        return filename[:-4] + ".safetensors"
    return filename


def _missing_on_hub(err: Exception) -> bool:
    """Whether a hub download failed because the repo has no such file (not because the hub is unreachable)."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    return isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError)


def cached_clip(model_name: str, pretrained: str | None, checkpoint: str | None, device: str = "auto") -> ClipScorer:
    """load_clip, once per process for the same arguments (Dask tasks on a worker share it)."""
    # a checkpoint saved again in place (train-clip into the same folder) is another model: its weights' time is in the key
    key = (model_name, pretrained, checkpoint and os.path.abspath(checkpoint), _weights_time(checkpoint), device)
    if key not in _CACHE:
        _CACHE[key] = load_clip(model_name, pretrained, checkpoint, device)
    return _CACHE[key]


def _weights_time(checkpoint: str | None) -> int | None:
    """When a local checkpoint's weights were last written (None without one, or when they are missing: load_clip then says so)."""
    if not checkpoint:
        return None
    path = Path(checkpoint) / WEIGHTS_NAME if Path(checkpoint).is_dir() else Path(checkpoint)
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


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
