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


def pen_mask(rgb: np.ndarray, params: TissueParams = TissueParams(), hsv: np.ndarray | None = None) -> np.ndarray:
    """Boolean [h, w] mask of red, green and blue marker ink in an RGB uint8 image.

    H&E occupies the pink-to-purple hues (about 260-350 degrees); ink is saturated
    pure red (hue <= 15 or >= 345 degrees, saturation >= 140), dense dark red/purple (315-345
    degrees, saturation >= 120, value < 110), green/cyan (70-200 degrees, saturation >= 40,
    green > red + 20) or blue (195-250 degrees, saturation >= 60, blue > red + 45, blue > green).
    ``hsv``: the image's ``COLOR_RGB2HSV_FULL`` when the caller has it already. The hue bands are
    given in HSV_FULL's units (256 = 360 degrees) and evaluated with OpenCV, ~2x faster than the
    same rules in numpy, which the tests check over every RGB colour.
    """
    if hsv is None:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    ink = cv2.inRange(hsv, *_PEN_BANDS["red_low"])
    for band in ("red_high", "dark_red"):
        ink |= cv2.inRange(hsv, *_PEN_BANDS[band])
    r, g, b = cv2.split(rgb)
    ink |= cv2.inRange(hsv, *_PEN_BANDS["green"]) & cv2.compare(cv2.subtract(g, r), 20, cv2.CMP_GT)
    ink |= (cv2.inRange(hsv, *_PEN_BANDS["blue"]) & cv2.compare(cv2.subtract(b, r), 45, cv2.CMP_GT)
            & cv2.compare(b, g, cv2.CMP_GT))
    return ink > 0


#: (low, high) HSV_FULL bounds of the ink hue bands (hue 0-255 for 0-360 degrees, inclusive):
#: hue <= 15 deg -> <= 10; >= 345 -> >= 246; [315, 345) -> 224-245; [70, 200) -> 50-142;
#: [195, 250) -> 139-177. Value < 110 -> <= 109.
_PEN_BANDS = {
    name: (np.array(lo, np.uint8), np.array(hi, np.uint8))
    for name, lo, hi in (
        ("red_low", (0, 140, 0), (10, 255, 255)),
        ("red_high", (246, 140, 0), (255, 255, 255)),
        ("dark_red", (224, 120, 0), (245, 255, 109)),
        ("green", (50, 40, 0), (142, 255, 255)),
        ("blue", (139, 60, 0), (177, 255, 255)),
    )
}


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

    ink = ink_mask(rgb, mpp, params)
    if ink.any():
        mask &= ~ink

    m = mask.astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _disk(round(params.close_um / mpp)))
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(1))
    mask = fill_small_holes(m > 0, params.max_hole_um2 / (mpp * mpp))
    if ink.any():
        mask &= ~ink  # holes filled across ink must not bring it back
    return _drop_small(mask, params.min_object_um2 / (mpp * mpp))


def ink_mask(rgb: np.ndarray, mpp: float = 8.0, params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean [h, w]: pen ink (blobs of at least ``min_pen_um2``) with a ``pen_dilate_um`` margin."""
    ink = _drop_small(pen_mask(rgb, params), params.min_pen_um2 / (mpp * mpp))
    if ink.any():
        ink = cv2.dilate(ink.astype(np.uint8), _disk(round(params.pen_dilate_um / mpp))) > 0
    return ink


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
