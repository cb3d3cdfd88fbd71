"""Image grids for a person to look at (samples, real vs generated)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(tiles: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [B, H, W, 3] -> one uint8 grid image with white padding."""
    b, h, w, _ = tiles.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = tiles[i]
    return out


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, cols: int | None = None) -> Path:
    """Save images ([B, 3, H, W] in [-1, 1] or uint8 [B, H, W, 3]) as a PNG grid."""
    tiles = to_uint8(images) if isinstance(images, torch.Tensor) else images
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_image(tiles, cols)).save(path)
    return path
