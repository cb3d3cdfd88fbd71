"""H0-mini (Bioptimus): ViT-B/14 with 4 register tokens, distilled from H-optimus-0.

Built offline with timm (``vit_base_patch14_reg4_dinov2``, img_size 224, SwiGLU packed MLP
with 4096 hidden units, SiLU, no head). Weights come only from a local file. At 224 px
the model sees 16x16 patch tokens; the REPA target is those tokens resized to 14x14
(bicubic, antialias) to match SiT/2's 14x14 tokens on 28x28 latents.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: Normalisation of H0-mini's model card (RGB in [0, 1]).
H0_MINI_MEAN = (0.707223, 0.578729, 0.703617)
H0_MINI_STD = (0.211883, 0.230117, 0.177517)
NUM_PREFIX_TOKENS = 5  # CLS + 4 registers


def build_h0_mini(weights: str | Path | None = None, tiny: bool = False) -> nn.Module:
    """The H0-mini architecture; loads ``weights`` (safetensors or torch) when given.

    ``tiny`` builds a 2-block, 64-wide model with the same token layout (tests only).
    Raises FileNotFoundError naming the path when ``weights`` does not exist.
    """
    import timm
    from timm.layers import SwiGLUPacked

    kwargs = dict(
        pretrained=False,
        img_size=224,
        num_classes=0,
        mlp_layer=SwiGLUPacked,
        act_layer=nn.SiLU,
        mlp_ratio=4096 / 768 + 1e-4,  # 4096 hidden units (int() of 768 * ratio)
        init_values=1e-5,
        dynamic_img_size=False,
    )
    if tiny:
        kwargs.update(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random init (tiny test models) never depends on the caller's RNG
        model = timm.create_model("vit_base_patch14_reg4_dinov2", **kwargs)
    if weights is not None:
        from .checkpoint import load_state_dict

        state = load_state_dict(weights, what="H0-mini")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: not an H0-mini state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)


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
