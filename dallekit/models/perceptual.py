"""A perceptual loss (LPIPS, Zhang et al. 2018) on VGG16 features, from weights the user gives as a local file.

LPIPS compares unit-normalised VGG16 activations at five depths (after relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3), weights each channel with a learned linear head, and averages
over space. The backbone is pretrained on ImageNet and cannot be downloaded here, so it is
used only when the user passes a .safetensors file holding torchvision's `vgg16().features`
weights (keys `features.N.weight` or `N.weight`) and, optionally, LPIPS's linear heads (keys
`lin.K.weight`, shape (1, C, 1, 1)); without heads every channel weighs the same. Nothing is
fetched and nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from dallekit.errors import BadInputError
from dallekit.models.weights import read_weights_file, weights_problem

TAPS = (3, 8, 15, 22, 29)  # indices in vgg16().features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_WIDTHS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's input scaling layer, for pixels in [-1, 1]
SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 convolutional tower up to relu5_3, with random weights (no download)."""
    from torchvision.models.vgg import cfgs, make_layers

    # vgg16().features without building the classifier: its 120M random weights took ~0.5 GB and 2.5 s, then were dropped
    return make_layers(cfgs["D"])[: TAPS[-1] + 1]


class PerceptualLoss(nn.Module):
    """LPIPS distance between two image batches (B, 3, S, S) in [-1, 1]; frozen, no gradients to its weights."""

    def __init__(self, features: nn.Sequential, heads: list[torch.Tensor] | None = None):
        super().__init__()
        self.features = features
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        weights = heads or [torch.full((1, c, 1, 1), 1.0 / c) for c in TAP_WIDTHS]
        for i, w in enumerate(weights):
            self.register_buffer(f"head_{i}", w.float())
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance (a scalar)."""
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total = h.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                a, b = (h / (h.norm(dim=1, keepdim=True) + 1e-10)).chunk(2)
                head = getattr(self, f"head_{TAPS.index(i)}")
                total = total + ((a - b) ** 2 * head).sum(dim=1).mean()
        return total

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Stay in eval mode whatever `mode` says."""
        return super().train(False)  # always in eval mode: a frozen measuring stick


def load_perceptual_loss(path: str | Path) -> PerceptualLoss:
    """The LPIPS loss with VGG16 weights (and optional linear heads) from a local safetensors file; bad input naming it otherwise."""
    tensors = read_weights_file(path, "VGG16 feature weights (torchvision's vgg16().features state dict)")
    features = vgg16_features()
    state = {k.removeprefix("features."): v for k, v in tensors.items() if not k.startswith("lin.")}
    expected = features.state_dict()
    missing = sorted(set(expected) - set(state), key=lambda k: int(k.split(".")[0]))
    if missing:
        raise BadInputError(f"{path}: not VGG16 feature weights (no tensor 'features.{missing[0]}'; expected torchvision's vgg16().features keys)")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise BadInputError(f"{path}: features.{key} has shape {tuple(state[key].shape)}, VGG16 expects {tuple(value.shape)}")
    named = nn.Module()  # the tower under the file's own key names, so that a problem names `features.N.weight`
    named.features = features
    problem = weights_problem(named, {f"features.{k}": state[k] for k in expected})
    if problem is not None:  # integer or non-finite tensors
        raise BadInputError(f"{path}: not usable VGG16 feature weights ({problem})")
    features.load_state_dict({k: state[k] for k in expected})
    heads = None
    if any(k.startswith("lin.") for k in tensors):
        heads = []
        for i, width in enumerate(TAP_WIDTHS):
            head = tensors.get(f"lin.{i}.weight")
            if head is None or tuple(head.shape) != (1, width, 1, 1) or not head.is_floating_point() or not bool(torch.isfinite(head).all()):
                got = "missing" if head is None else f"of shape {tuple(head.shape)} and dtype {str(head.dtype).removeprefix('torch.')}"
                raise BadInputError(f"{path}: lin.{i}.weight is {got}, expected finite floating-point values of shape (1, {width}, 1, 1)")
            heads.append(head.clamp(min=0))
    return PerceptualLoss(features, heads)
