"""H0-mini (Bioptimus): ViT-B/14 with 4 register tokens, distilled from H-optimus-0.

Built offline with timm (``vit_base_patch14_reg4_dinov2``, img_size 224, SwiGLU packed MLP
with 4096 hidden units, SiLU, no head) through the registry (entry ``h0_mini``). Weights come
only from a local file (or ``random:small`` for tests). At 224 px
the model sees 16x16 patch tokens; the REPA target is those tokens resized to 14x14
(bicubic, antialias) to match SiT/2's 14x14 tokens on 28x28 latents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import build_network

#: Normalisation of H0-mini's model card (RGB in [0, 1]).
H0_MINI_MEAN = (0.707223, 0.578729, 0.703617)
H0_MINI_STD = (0.211883, 0.230117, 0.177517)
NUM_PREFIX_TOKENS = 5  # CLS + 4 registers


def build_h0_mini(weights) -> nn.Module:
    """The frozen H0-mini network from a weight spec: a local file (timm layout, strict) or
    ``random:small`` (2 blocks, 64 wide, same token layout: tests and demos). See the registry."""
    return build_network("h0_mini", weights)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """RGB float in [0, 1], [B, 3, 224, 224] -> H0-mini input."""
    mean = torch.tensor(H0_MINI_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(H0_MINI_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def resize_tokens(patch: torch.Tensor, size: int = 14) -> torch.Tensor:
    """[B, 256, D] patch tokens on a 16x16 grid -> [B, size*size, D] (bicubic, antialias)."""
    b, n, d = patch.shape
    g = int(round(n**0.5))
    grid = patch.transpose(1, 2).reshape(b, d, g, g).float()
    out = F.interpolate(grid, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return out.reshape(b, d, size * size).transpose(1, 2)


@torch.no_grad()
def h0_mini_features(model: nn.Module, images: torch.Tensor, token_grid: int = 14) -> tuple[torch.Tensor, torch.Tensor]:
    """images: RGB in [0, 1], [B, 3, 224, 224] -> (CLS [B, D], tokens [B, token_grid^2, D])."""
    out = model.forward_features(normalize(images))
    cls = out[:, 0]
    patch = out[:, NUM_PREFIX_TOKENS:]
    return cls.float(), resize_tokens(patch, token_grid)
