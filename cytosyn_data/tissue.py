"""Tissue detection at low resolution (about 8 microns per pixel).

Tissue = saturated (HSV saturation above Otsu's threshold, with a floor) and not dark
debris, minus pen ink (red, green, blue hue bands), cleaned with morphology. Tile
candidates come from an integral image of the mask. All thresholds are 0-255 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class TissueParams:
    """Thresholds for :func:`tissue_mask`; sizes are in microns at the mask's resolution."""

    saturation_floor: int = 20  # min HSV saturation (0-255) even when Otsu picks lower
    saturation_ceiling: int = 60  # Otsu may not demand more saturation than this
    value_min: int = 30  # darker pixels (V < value_min) are debris or marker, not tissue
    pen_dilate_um: float = 96.0  # margin removed around ink
    min_object_um2: float = 20_000.0  # tissue specks smaller than this are dropped
    min_pen_um2: float = 4_000.0  # ink blobs smaller than this are stain, not pen
    close_um: float = 24.0  # closing radius that joins nearby tissue
    max_hole_um2: float = 50_000.0  # enclosed gaps smaller than this are filled; larger ones stay glass


def pen_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean [h, w] mask of red, green and blue marker ink in an RGB uint8 image.

    H&E occupies the pink-to-purple hues (about 260-350 degrees); ink is saturated
    pure red (hue <= 15 or >= 352 degrees with green and blue low), green/cyan
    (70-200 degrees) or blue (200-250 degrees with blue far above red).
    """
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)  # hue 0-255 for 0-360 degrees
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    sat = hsv[..., 1]
    r = rgb[..., 0].astype(np.int16)
    g = rgb[..., 1].astype(np.int16)
    b = rgb[..., 2].astype(np.int16)
    val = hsv[..., 2]
    red = ((hue <= 15) | (hue >= 345)) & (sat >= 140)
    dark_red = (hue >= 315) & (hue < 345) & (sat >= 120) & (val < 110)  # dense red/purple ink
    green = (sat >= 40) & (hue >= 70) & (hue < 200) & (g > r + 20)
    blue = (sat >= 60) & (hue >= 195) & (hue < 250) & (b - r > 45) & (b > g)
    return red | dark_red | green | blue


def _disk(radius_px: int) -> np.ndarray:
    r = max(int(radius_px), 1)
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def tissue_mask(rgb: np.ndarray, mpp: float = 8.0, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean [h, w] tissue mask of an RGB uint8 image whose pixels are ``mpp`` microns wide."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    sat = cv2.GaussianBlur(hsv[..., 1], (3, 3), 0)
    val = hsv[..., 2]
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = float(np.clip(otsu, params.saturation_floor, params.saturation_ceiling))
    mask = (sat > thr) & (val >= params.value_min)

    ink = _drop_small(pen_mask(rgb, params), params.min_pen_um2 / (mpp * mpp))
    if ink.any():
        ink = cv2.dilate(ink.astype(np.uint8), _disk(round(params.pen_dilate_um / mpp))) > 0
        mask &= ~ink

    m = mask.astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _disk(round(params.close_um / mpp)))
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(1))
    mask = fill_small_holes(m > 0, params.max_hole_um2 / (mpp * mpp))
    if ink.any():
        mask &= ~ink  # holes filled across ink must not bring it back
    return _drop_small(mask, params.min_object_um2 / (mpp * mpp))


def fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill the holes of ``mask`` (background regions not connected to the border) smaller than
    ``max_px`` pixels; a large enclosed glass area (a lumen, a tear) stays background."""
    holes = enclosed_background(mask)
    if not holes.any():
        return mask
    return mask | _drop_small(holes, 0) & ~_drop_small(holes, max_px)


def enclosed_background(mask: np.ndarray) -> np.ndarray:
    """Background pixels not 4-connected to the image border: ``scipy.ndimage.binary_fill_holes(mask)
    & ~mask`` (equal, tested), with OpenCV's labelling (scipy's import alone costs more than a slide's
    whole tissue detection)."""
    n, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    enclosed = np.ones(n, dtype=bool)
    enclosed[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
    return enclosed[labels] & ~mask


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Remove 8-connected components smaller than ``min_px`` pixels."""
    if not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return keep[labels]


def tile_tissue_fractions(
    mask: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    footprint: float,
    level0_size: tuple[int, int],
) -> np.ndarray:
    """Fraction of mask pixels inside each tile, via an integral image.

    ``x0, y0``: level-0 top-left pixels; ``footprint``: tile side in level-0 pixels;
    ``level0_size``: (w, h) of level 0, which the mask [h, w] covers.
    """
    mh, mw = mask.shape
    sx = mw / level0_size[0]
    sy = mh / level0_size[1]
    integral = cv2.integral(mask.astype(np.uint8))  # [mh+1, mw+1], int32
    ax = np.clip(np.rint(x0 * sx).astype(np.int64), 0, mw)
    bx = np.clip(np.rint((x0 + footprint) * sx).astype(np.int64), 0, mw)
    ay = np.clip(np.rint(y0 * sy).astype(np.int64), 0, mh)
    by = np.clip(np.rint((y0 + footprint) * sy).astype(np.int64), 0, mh)
    bx = np.maximum(bx, ax + 1).clip(max=mw)
    by = np.maximum(by, ay + 1).clip(max=mh)
    area = (bx - ax) * (by - ay)
    inside = integral[by, bx] - integral[ay, bx] - integral[by, ax] + integral[ay, ax]
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0)
