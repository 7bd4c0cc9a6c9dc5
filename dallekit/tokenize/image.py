"""The image tokenizer: a trained dVAE or FSQ autoencoder loaded from its folder, encoding pixels to codes and back.

The folder's config.json says which kind it is (`model`: dallekit-dvae or dallekit-fsq); both
models encode (B, 3, S, S) pixels in [0, 1] to (B, G, G) codes and decode them back, so every
command that reads a tokenizer folder works with either.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from dallekit.errors import BadInputError
from dallekit.models.dvae import DVAE, DVAEConfig
from dallekit.models.fsq import FSQAutoencoder, FSQConfig
from dallekit.models.weights import (
    build_model,
    load_model_state,
    load_weights,
    pick_device,
)

_CACHE: dict[tuple, ImageTokenizer] = {}  # one tokenizer per worker process
TOKENIZER_KINDS = {"dallekit-dvae": (DVAE, DVAEConfig), "dallekit-fsq": (FSQAutoencoder, FSQConfig)}  # config.json `model` -> classes


class ImageTokenizer:
    """A dVAE or FSQ tokenizer in eval mode with its kind and identity (sha256 of the weights) for token-file metadata."""

    def __init__(self, model: DVAE | FSQAutoencoder, kind: str, sha256: str, device: torch.device):
        self.model = model.to(device).eval()
        self.config: DVAEConfig | FSQConfig = model.config
        self.kind, self.sha256, self.device = kind, sha256, device

    @classmethod
    def load(cls, model_dir: str, device: str = "auto") -> ImageTokenizer:
        """Load a tokenizer folder written by train-tokenizer (train-dvae) or convert-openai-dvae."""
        values, state = load_model_state(model_dir)
        kind = values.get("model", "dallekit-dvae")  # folders from before the kind was recorded are dVAEs
        if not isinstance(kind, str) or kind not in TOKENIZER_KINDS:
            raise BadInputError(f"{model_dir}: config.json says model {kind!r}, expected an image tokenizer ({' or '.join(TOKENIZER_KINDS)})")
        model = build_model(*TOKENIZER_KINDS[kind], values, model_dir)
        load_weights(model, state, model_dir)
        digest = hashlib.sha256(Path(model_dir, "model.safetensors").read_bytes()).hexdigest()
        return cls(model, kind, digest, pick_device(device))

    def metadata(self) -> dict:
        """The `image_tokenizer` entry of token-file metadata: kind, its settings, and the weights' sha256."""
        c = self.config
        entry = {"kind": self.kind, "codebook_size": c.codebook_size, "grid": c.grid, "image_size": c.image_size, "sha256": self.sha256}
        return entry | ({"levels": list(c.levels)} if isinstance(c, FSQConfig) else {})

    @torch.no_grad()
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 images (B, S, S, 3) -> uint16 codes (B, G*G), row-major."""
        x = torch.from_numpy(np.require(pixels, requirements="W")).to(self.device).permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
        with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
            codes = self.model.encode(x)  # (B, G, G)
        return codes.reshape(len(pixels), -1).cpu().numpy().astype(np.uint16)

    @torch.no_grad()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (B, G*G) -> uint8 images (B, S, S, 3)."""
        g = self.config.grid
        c = torch.as_tensor(np.asarray(codes, dtype=np.int64)).to(self.device).reshape(-1, g, g)
        x = self.model.decode(c)  # (B, 3, S, S)
        return (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def cached_image_tokenizer(model_dir: str, device: str = "auto") -> ImageTokenizer:
    """ImageTokenizer.load once per process for the same folder."""
    key = (os.path.abspath(model_dir), device)
    if key not in _CACHE:
        _CACHE[key] = ImageTokenizer.load(model_dir, device)
    return _CACHE[key]
