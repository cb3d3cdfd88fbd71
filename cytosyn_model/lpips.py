"""LPIPS (Zhang et al. 2018) with a VGG-16 trunk, built offline: the perceptual term of REPA-E's VAE
loss. Weights from local files only (see the class)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import vgg16

from cytosyn_encoders.weights import RandomWeights, load_state_dict, parse_weights

__all__ = ["LPIPS"]


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018) with a VGG-16 trunk, built offline.

    ``vgg_weights``: a torchvision ``vgg16`` state dict (``features.*`` keys used); ``lin_weights``:
    the LPIPS v0.1 linear layers (``lin{0..4}.model.1.weight``). Both are weight specs of
    :mod:`cytosyn_encoders.weights`: local files (missing ones raise FileNotFoundError naming the
    path), or ``random[:seed=N]`` (a seeded random VGG; constant lin weights 1/C): a test network,
    not a perceptual metric.
    """

    CHANNELS = (64, 128, 256, 512, 512)
    SLICES = (4, 9, 16, 23, 30)  # ends of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, vgg_weights=None, lin_weights=None):
        super().__init__()

        vgg_spec, lin_spec = parse_weights(vgg_weights), parse_weights(lin_weights)
        if vgg_spec is None or lin_spec is None:
            raise FileNotFoundError(
                "LPIPS needs local VGG-16 and LPIPS-lin weights (lpips_vgg_weights, lpips_lin_weights in the "
                "config); they are never downloaded. Set lpips_weight: 0 to train without LPIPS"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(vgg_spec.seed if isinstance(vgg_spec, RandomWeights) else 0)
            features = vgg16(weights=None).features
        if not isinstance(vgg_spec, RandomWeights):
            vgg = load_state_dict(vgg_spec, "LPIPS VGG-16")
            features.load_state_dict({k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")})
        self.slices = nn.ModuleList()
        start = 0
        for end in self.SLICES:
            self.slices.append(nn.Sequential(*[features[i] for i in range(start, end)]))
            start = end
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.CHANNELS)
        if isinstance(lin_spec, RandomWeights):
            for conv in self.lins:
                nn.init.constant_(conv.weight, 1.0 / conv.in_channels)
        else:
            lin = load_state_dict(lin_spec, "LPIPS lin layers")
            for i, conv in enumerate(self.lins):
                conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance [B] between images in [-1, 1]."""
        ha, hb = (a - self.shift) / self.scale, (b - self.shift) / self.scale
        total = 0.0
        for sl, lin in zip(self.slices, self.lins):
            ha, hb = sl(ha), sl(hb)
            na = ha / (ha.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = hb / (hb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb).pow(2)).mean(dim=(2, 3))
        return total.squeeze(1)
