"""The DALL-E discrete VAE (Ramesh et al. 2021): ResNet encoder/decoder over a grid of codes.

The encoder maps an image to codebook logits per grid cell; training relaxes the code choice
with Gumbel-softmax (temperature annealed from 1 to 1/16, cosine) and adds a KL term to a
uniform prior (weight warmed up to 6.6 in the paper); encoding for the transformer takes the
argmax code. Module names follow OpenAI's `dall_e` package (blocks.input, blocks.group_1.block_1
.res_path.conv_1, ...) so its released weights convert one to one.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1  # pixels are mapped into [eps, 1 - eps] before the logit


@dataclass
class DVAEConfig:
    """Architecture and training schedule of a dVAE; presets live in DVAE_PRESETS."""

    image_size: int = 256  # input side in pixels
    codebook_size: int = 8192  # number of codes = image-token vocabulary
    n_groups: int = 4  # ResNet groups; the grid is image_size / 2**(n_groups - 1)
    n_hid: int = 256  # width of the first group; group g is n_hid * 2**(g-1) wide
    n_blk_per_group: int = 2  # bottleneck blocks per group
    n_init: int = 128  # width of the decoder's first 1x1 conv
    channels: int = 3  # RGB
    recon_loss: str = "logit_laplace"  # "logit_laplace" (the paper's) or "mse"
    kl_weight: float = 6.6  # KL-to-uniform weight reached after kl_warmup_steps
    kl_warmup_steps: int = 5000  # linear warm-up of the KL weight from 0
    temp_start: float = 1.0  # Gumbel-softmax temperature at step 0
    temp_end: float = 1 / 16  # temperature after temp_anneal_steps (cosine)
    temp_anneal_steps: int = 150_000
    lr: float = 1e-4  # AdamW learning rate at step 0
    lr_end: float = 1.25e-6  # learning rate at max_steps (cosine decay)
    weight_decay: float = 1e-4
    batch_size: int = 64  # images per step
    max_steps: int = 150_000

    @property
    def grid(self) -> int:
        """Tokens per image side."""
        return self.image_size // 2 ** (self.n_groups - 1)

    @classmethod
    def from_dict(cls, values: dict) -> DVAEConfig:
        """Build from a JSON dict, ignoring keys this version does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


DVAE_PRESETS: dict[str, dict] = {
    # the paper's model: 256 px, 32x32 grid, 8192 codes
    "dalle": dict(),
    # 64 px, 16x16 grid: a demo-sized model for a small GPU or a patient CPU
    "small": dict(image_size=64, codebook_size=512, n_groups=3, n_hid=64, n_blk_per_group=1, n_init=64,
                  recon_loss="mse", kl_weight=0.05, kl_warmup_steps=500, temp_anneal_steps=4000,
                  lr=2e-3, lr_end=5e-5, weight_decay=0.0, batch_size=32, max_steps=5000),
    # 32 px, 8x8 grid, 128 codes: trains in minutes on 2 CPU cores (tests and the demo). Width 64 and
    # 2 blocks per group: the narrower, shallower model loses the demo triangles' apex (docs/demo-notes.md)
    "tiny": dict(image_size=32, codebook_size=128, n_groups=3, n_hid=64, n_blk_per_group=2, n_init=64,
                 recon_loss="mse", kl_weight=0.05, kl_warmup_steps=300, temp_anneal_steps=1500,
                 lr=2e-3, lr_end=5e-5, weight_decay=0.0, batch_size=32, max_steps=1800),
}


def dvae_config(preset: str, **overrides) -> DVAEConfig:
    """The config of a named preset, with overrides."""
    if preset not in DVAE_PRESETS:
        raise KeyError(f"unknown dVAE preset {preset!r} (expected one of {', '.join(DVAE_PRESETS)})")
    return DVAEConfig(**(DVAE_PRESETS[preset] | overrides))


class BottleneckBlock(nn.Module):
    """ResNet bottleneck block, residual scaled by 1/n_layers**2; kernels (3,3,3,1) encode, (1,3,3,3) decode."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, k in enumerate(kernels):  # relu_1 reads the block's input, which id_path needs; the later ones may overwrite conv outputs
            layers += [(f"relu_{i + 1}", nn.ReLU(inplace=i > 0)), (f"conv_{i + 1}", nn.Conv2d(widths[i], widths[i + 1], k, padding=k // 2))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *body, last = self.res_path
        h = x
        for layer in body:
            h = layer(h)
        # post_gain scales the last conv's weights, not its output: one multiply of a few thousand weights per step, not of the activations
        return self.id_path(x) + F.conv2d(h, last.weight * self.post_gain, last.bias * self.post_gain, padding=last.padding)


ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


class Encoder(nn.Module):
    """(B, 3, S, S) mapped pixels -> (B, K, G, G) code logits."""

    def __init__(self, c: DVAEConfig):
        super().__init__()
        n_layers = c.n_groups * c.n_blk_per_group
        layers: list[tuple[str, nn.Module]] = [("input", nn.Conv2d(c.channels, c.n_hid, 7, padding=3))]
        width = c.n_hid
        for g in range(1, c.n_groups + 1):
            out = c.n_hid * 2 ** (g - 1)
            group = [(f"block_{i + 1}", BottleneckBlock(width if i == 0 else out, out, n_layers, ENCODER_KERNELS)) for i in range(c.n_blk_per_group)]
            if g < c.n_groups:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            width = out
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(width, c.codebook_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    """(B, K, G, G) code one-hots (or relaxed) -> (B, 2*3, S, S) pixel statistics (mean logits, log-scales)."""

    def __init__(self, c: DVAEConfig):
        super().__init__()
        n_layers = c.n_groups * c.n_blk_per_group
        layers: list[tuple[str, nn.Module]] = [("input", nn.Conv2d(c.codebook_size, c.n_init, 1))]
        width = c.n_init
        for g in range(1, c.n_groups + 1):
            out = c.n_hid * 2 ** (c.n_groups - g)
            group = [(f"block_{i + 1}", BottleneckBlock(width if i == 0 else out, out, n_layers, DECODER_KERNELS)) for i in range(c.n_blk_per_group)]
            if g < c.n_groups:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            width = out
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(width, 2 * c.channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


def gumbel_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Relaxed one-hot samples over dim 1, as F.gumbel_softmax(hard=False).

    Its Gumbel noise is -log(-log(U)) of fp32 uniforms: the same distribution as -log of
    exponential draws, but torch's CPU exponential_ took five times as long as the uniforms.
    """
    uniform = torch.rand(logits.shape, device=logits.device).clamp_(min=torch.finfo(torch.float32).tiny)
    return ((logits + uniform.log_().neg_().log_().neg_()) / temperature).softmax(dim=1)


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels -> [eps, 1 - eps], where the logit stays finite."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class DVAE(nn.Module):
    """Encoder + decoder with the relaxed training objective and hard encode/decode for tokens."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        if config.image_size % 2 ** (config.n_groups - 1):
            raise ValueError(f"image_size {config.image_size} is not divisible by 2**(n_groups-1)")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def reconstruct_pixels(self, stats: torch.Tensor) -> torch.Tensor:
        """Decoder statistics (B, 6, S, S) -> unclamped [0, 1] pixels (B, 3, S, S)."""
        return (torch.sigmoid(stats[:, : self.config.channels]) - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)

    def forward(self, x: torch.Tensor, temperature: float, kl_weight: float) -> dict[str, torch.Tensor]:
        """Training step on pixels x (B, 3, S, S) in [0, 1]: the loss and its two terms."""
        c = self.config
        logits = self.encoder(map_pixels(x))  # (B, K, G, G)
        z = gumbel_softmax(logits, temperature)  # (B, K, G, G), relaxed one-hot
        stats = self.decoder(z).float()  # (B, 6, S, S)
        if c.recon_loss == "logit_laplace":
            recon = logit_laplace_nll(map_pixels(x), stats[:, : c.channels], stats[:, c.channels :])
        elif c.recon_loss == "mse":
            recon = F.mse_loss(self.reconstruct_pixels(stats), x)
        else:
            raise ValueError(f"unknown recon_loss {c.recon_loss!r}")
        log_q = F.log_softmax(logits.float(), dim=1)
        # KL(q || uniform) per cell, summed over the grid, normalised by the pixel count as in the paper
        kl = (log_q.exp() * (log_q + math.log(c.codebook_size))).sum(dim=1).sum(dim=(1, 2)).mean() / (c.channels * c.image_size**2)
        return {"loss": recon + kl_weight * kl, "recon": recon, "kl": kl}

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, S, S) in [0, 1] -> argmax codes (B, G, G), no Gumbel noise."""
        return self.encoder(map_pixels(x)).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, G, G) -> pixels (B, 3, S, S) in [0, 1]."""
        z = F.one_hot(codes.long(), self.config.codebook_size).permute(0, 3, 1, 2).float()  # (B, K, G, G)
        return self.reconstruct_pixels(self.decoder(z).float()).clamp(0, 1)


def logit_laplace_nll(x_mapped: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of mapped pixels under the logit-Laplace distribution.

    p(x) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)). The log-scale is clamped from below: a
    scale that collapses to zero on flat regions makes the loss (and its gradients) explode,
    which is what keeps an unclamped model from training.
    """
    log_scale = log_scale.clamp(min=-4.0)
    logit_x = torch.log(x_mapped) - torch.log1p(-x_mapped)
    nll = math.log(2) + log_scale + torch.log(x_mapped * (1 - x_mapped)) + (logit_x - mu).abs() * torch.exp(-log_scale)
    return nll.mean()


def config_dict(config: DVAEConfig) -> dict:
    """The config as a JSON-ready dict (with the derived grid for readers)."""
    return asdict(config) | {"grid": config.grid}


def save_dvae_config(config: DVAEConfig) -> dict:
    """The config.json content of a dVAE folder."""
    return config_dict(config) | {"model": "dallekit-dvae"}
