"""A PatchGAN discriminator (pix2pix's NLayerDiscriminator) and the hinge losses of VQGAN and LlamaGen.

It scores overlapping patches of an image as real or reconstructed; the tokenizer's decoder is
trained to fool it after a warm-up, which sharpens edges that an L2 loss alone leaves blurred.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DiscriminatorConfig:
    """PatchGAN size; the tokenizer's config sets it."""

    width: int = 64  # channels of the first layer, doubled per strided layer
    n_layers: int = 2  # strided layers (pix2pix: 3 at 256 px); patches see about 2**(n_layers+2) px


class PatchDiscriminator(nn.Module):
    """(B, 3, S, S) pixels in [-1, 1] -> (B, 1, P, P) real/fake logits, one per patch."""

    def __init__(self, c: DiscriminatorConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, c.width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = c.width
        for n in range(1, c.n_layers + 1):
            out = c.width * 2 ** min(n, 3)
            stride = 2 if n < c.n_layers else 1
            # GroupNorm, not pix2pix's BatchNorm: real and reconstructed batches go through separately
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1), nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: real patches pushed above +1, reconstructed ones below -1."""
    return 0.5 * (F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge loss: raise the discriminator's score of reconstructions."""
    return -fake_logits.float().mean()
