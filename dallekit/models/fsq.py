"""An FSQ image tokenizer: a convolutional autoencoder whose latents are finite-scalar quantized.

Finite Scalar Quantization (Mentzer et al. 2023, "FSQ: VQ-VAE Made Simple"): the encoder
projects each grid cell to d = len(levels) channels, each channel is bounded and rounded to
one of L_i values with a straight-through gradient, and the code id is the mixed-radix number
of the rounded values. No codebook, no commitment or entropy loss, and close to every code in
use. The encoder and decoder are VQGAN-style ResNet stacks (GroupNorm, SiLU); training (in
`training/tokenizer.py`) adds a PatchGAN hinge loss after a warm-up and, when the user gives
VGG16 weights, a perceptual loss, as LlamaGen's tokenizer does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_CODES = 65_535  # token Parquet stores codes as uint16


@dataclass
class FSQConfig:
    """Architecture and training schedule of an FSQ tokenizer; presets live in FSQ_PRESETS."""

    image_size: int = 32  # input side in pixels
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # values per latent channel; codes = their product
    width: int = 64  # channels at full resolution
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # width multiple per resolution; grid = image_size / 2**(len-1)
    n_res_blocks: int = 1  # ResNet blocks per resolution (encoder; the decoder has one more)
    lr: float = 1e-3  # AdamW learning rate at step 0 (after warm-up)
    lr_end: float = 5e-5  # learning rate at max_steps (cosine decay)
    warmup_steps: int = 100  # linear learning-rate warm-up
    weight_decay: float = 0.0
    batch_size: int = 32  # images per step
    max_steps: int = 2000
    disc_start: int = 1000  # step at which the PatchGAN hinge loss switches on (LlamaGen: after a warm-up)
    disc_weight: float = 0.1  # weight of the generator's adversarial loss (LlamaGen: 0.5 at 256 px)
    disc_width: int = 64  # channels of the discriminator's first layer
    disc_layers: int = 2  # strided layers of the discriminator (PatchGAN: 3 at 256 px)
    perceptual_weight: float = 1.0  # weight of the VGG perceptual loss, used only when weights are given
    ema_decay: float = 0.999  # exponential moving average of the weights (0: none), used for evaluation and the saved model

    @property
    def grid(self) -> int:
        """Tokens per image side."""
        return self.image_size // 2 ** (len(self.channel_mult) - 1)

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes: the product of the levels."""
        return math.prod(self.levels)

    @classmethod
    def from_dict(cls, values: dict) -> FSQConfig:
        """Build from a JSON dict, ignoring keys this version does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


FSQ_PRESETS: dict[str, dict] = {
    # 32 px, 8x8 grid, 1,000 codes ([8,5,5,5], the paper's mid setting): trains in minutes on 2 CPU cores
    "fsq-tiny": dict(),
    # 32 px, 8x8 grid, 240 codes ([8,6,5]): fewer codes, an easier vocabulary for a small transformer
    "fsq-tiny-240": dict(levels=[8, 6, 5]),
    # 64 px, 16x16 grid, 1,000 codes
    "fsq-small": dict(image_size=64, width=64, channel_mult=[1, 2, 2], max_steps=6000, disc_start=3000, batch_size=32),
    # 64 px, 16x16 grid, 4,375 codes ([7,5,5,5,5]), wider: for a GPU
    "fsq-base": dict(image_size=64, levels=[7, 5, 5, 5, 5], width=128, channel_mult=[1, 2, 2], n_res_blocks=2,
                     max_steps=20000, disc_start=10000, batch_size=64, disc_weight=0.5),
}


def _whole(value) -> bool:
    """A whole number (not a bool, float or string) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_fsq_config(c: FSQConfig) -> None:
    """Raise ValueError naming the setting when the levels, the widths or the image size cannot make a token grid."""
    for name in ("image_size", "width", "n_res_blocks"):
        if not _whole(getattr(c, name)):
            raise ValueError(f"{name} {getattr(c, name)!r}: expected a whole number of at least 1")
    if not isinstance(c.channel_mult, list) or not c.channel_mult or not all(_whole(m) for m in c.channel_mult):
        raise ValueError(f"channel_mult {c.channel_mult!r}: expected a list of whole numbers of at least 1")
    if not isinstance(c.levels, list) or not c.levels or any(not _whole(level) or level < 2 for level in c.levels):
        raise ValueError(f"levels {c.levels}: expected whole numbers of at least 2")
    if c.codebook_size > MAX_CODES:
        raise ValueError(f"levels {c.levels} make {c.codebook_size} codes: at most {MAX_CODES} fit the token files' uint16")
    if c.image_size % 2 ** (len(c.channel_mult) - 1) or c.image_size < 2 ** (len(c.channel_mult) - 1):
        raise ValueError(f"image_size {c.image_size}: expected a multiple of {2 ** (len(c.channel_mult) - 1)} "
                         f"({len(c.channel_mult) - 1} halvings to the token grid)")


def fsq_config(preset: str, **overrides) -> FSQConfig:
    """The config of a named preset, with overrides."""
    if preset not in FSQ_PRESETS:
        raise KeyError(f"unknown FSQ preset {preset!r} (expected one of {', '.join(FSQ_PRESETS)})")
    return FSQConfig(**(FSQ_PRESETS[preset] | overrides))


class FSQ(nn.Module):
    """Finite scalar quantizer: (B, d, G, G) latents -> quantized values in [-1, 1] and mixed-radix code ids."""

    def __init__(self, levels: list[int], eps: float = 1e-3):
        super().__init__()
        levels_t = torch.tensor(levels, dtype=torch.int64)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0), persistent=False)
        self.eps = eps

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """The paper's bound: tanh scaled so that rounding gives exactly L values per channel (offset for even L)."""
        levels = self.levels.view(1, -1, 1, 1).to(z.dtype)
        half_l = (levels - 1) * (1 - self.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        # the paper's h = (L-1)(1-eps)/2 is below 1/2 at L = 2, where atanh(offset/h) is undefined (NaN codes);
        # capped, L = 2 gets vector-quantize-pytorch's shift and every L >= 3 the paper's exact one
        shift = torch.atanh((offset / half_l).clamp(max=1 - self.eps))
        return torch.tanh(z + shift) * half_l - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, d, G, G) -> (quantized (B, d, G, G) in [-1, 1] with straight-through gradients, codes (B, G, G))."""
        bounded = self.bound(z.float())
        rounded = bounded + (bounded.round() - bounded).detach()  # straight-through estimator
        half_width = (self.levels // 2).view(1, -1, 1, 1)
        codes = ((rounded.detach().round().long() + half_width) * self.basis.view(1, -1, 1, 1)).sum(dim=1)  # (B, G, G)
        return rounded / half_width, codes

    def codes_to_values(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids (B, G, G) -> quantized values (B, d, G, G) in [-1, 1]."""
        digits = (codes.long().unsqueeze(1) // self.basis.view(1, -1, 1, 1)) % self.levels.view(1, -1, 1, 1)
        half_width = (self.levels // 2).view(1, -1, 1, 1)
        return (digits - half_width).float() / half_width


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1 when widths differ) skip: VQGAN's block."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(32, n_in // 4), n_in), nn.Conv2d(n_in, n_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(min(32, n_out // 4), n_out), nn.Conv2d(n_out, n_out, 3, padding=1)
        self.skip = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    """(B, 3, S, S) pixels in [-1, 1] -> (B, d, G, G) latents."""

    def __init__(self, c: FSQConfig):
        super().__init__()
        widths = [c.width * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        stages, n_in = [], widths[0]
        for i, n_out in enumerate(widths):
            blocks: list[nn.Module] = []
            for _ in range(c.n_res_blocks):
                blocks.append(ResBlock(n_in, n_out))
                n_in = n_out
            if i < len(widths) - 1:
                blocks.append(nn.Conv2d(n_in, n_in, 4, stride=2, padding=1))  # halve the resolution
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.mid = ResBlock(n_in, n_in)
        self.norm_out, self.conv_out = nn.GroupNorm(min(32, n_in // 4), n_in), nn.Conv2d(n_in, len(c.levels), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.stages(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, d, G, G) quantized values -> (B, 3, S, S) pixels in [-1, 1] (unclamped)."""

    def __init__(self, c: FSQConfig):
        super().__init__()
        widths = [c.width * m for m in reversed(c.channel_mult)]
        self.conv_in = nn.Conv2d(len(c.levels), widths[0], 3, padding=1)
        self.mid = ResBlock(widths[0], widths[0])
        stages, n_in = [], widths[0]
        for i, n_out in enumerate(widths):
            blocks: list[nn.Module] = []
            for _ in range(c.n_res_blocks + 1):
                blocks.append(ResBlock(n_in, n_out))
                n_in = n_out
            if i < len(widths) - 1:
                blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(n_in, n_in, 3, padding=1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm_out, self.conv_out = nn.GroupNorm(min(32, n_in // 4), n_in), nn.Conv2d(n_in, 3, 3, padding=1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.mid(self.conv_in(q)))
        return self.conv_out(F.silu(self.norm_out(h)))


class FSQAutoencoder(nn.Module):
    """Encoder, FSQ and decoder, with the same encode/decode interface as the dVAE (codes (B, G, G))."""

    def __init__(self, config: FSQConfig):
        super().__init__()
        check_fsq_config(config)
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = FSQ(list(config.levels))
        self.decoder = Decoder(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels x (B, 3, S, S) in [0, 1] -> (reconstruction in [0, 1], unclamped; codes (B, G, G))."""
        values, codes = self.quantizer(self.encoder(x * 2 - 1))
        return (self.decoder(values).float() + 1) / 2, codes

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, S, S) in [0, 1] -> codes (B, G, G)."""
        return self.quantizer(self.encoder(x * 2 - 1))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, G, G) -> pixels (B, 3, S, S) in [0, 1]."""
        return ((self.decoder(self.quantizer.codes_to_values(codes)).float() + 1) / 2).clamp(0, 1)


def save_fsq_config(config: FSQConfig) -> dict:
    """The config.json content of an FSQ tokenizer folder (with the derived grid and code count for readers)."""
    return asdict(config) | {"grid": config.grid, "codebook_size": config.codebook_size, "model": "dallekit-fsq"}
