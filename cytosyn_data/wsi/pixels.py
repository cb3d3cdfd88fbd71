"""Pixel helpers shared by the slide readers: level-0 -> level pixel coordinates, and RGBA onto
white (as openslide composites transparent regions)."""

from __future__ import annotations

import numpy as np

__all__ = ["composite_on_white", "level_pixel"]


def level_pixel(location: tuple[int, int], downsample: float) -> tuple[int, int]:
    """Level-0 pixel -> level pixel: the nearest, ``floor(location / downsample + 0.5)``.

    The one mapping from a tile key to its read window: grid keys are ``rint(level px * downsample)``
    (``ReadPlan.level0_xy``), so this gives back their level pixel exactly, also at non-integer
    downsamples such as 2.0005, where flooring would start a tile one pixel early."""
    return int(np.floor(location[0] / downsample + 0.5)), int(np.floor(location[1] / downsample + 0.5))


def composite_on_white(pixels: np.ndarray) -> np.ndarray:
    """RGB(A) uint8 [h, w, 3|4] -> RGB uint8; transparent pixels become white (alpha blend)."""
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 3:
        return np.ascontiguousarray(pixels)
    rgb = pixels[..., :3]
    alpha = pixels[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)
