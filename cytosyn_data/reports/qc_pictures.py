"""QC pictures: slide thumbnails with the tissue mask and the tile grid drawn on them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import polars as pl

from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.io.png import decode_png, encode_png
from cytosyn_data.run.paths import DetectFiles
from cytosyn_data.run.records import SlideFacts


def overlay_tiles(
    thumb: np.ndarray, mask: np.ndarray, cand: pl.DataFrame, footprint: float, level0_width: int
) -> np.ndarray:
    """Thumbnail [h, w, 3] with non-tissue dimmed, candidates outlined (yellow), selected tiles (green)."""
    img = thumb.astype(np.float32)
    if mask.shape != thumb.shape[:2]:
        mask = cv2.resize(mask.astype(np.uint8), thumb.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
    img[~mask] = img[~mask] * 0.45 + 40
    img = img.clip(0, 255).astype(np.uint8)
    scale = thumb.shape[1] / level0_width
    # draw on a 2x upscaled picture so single tiles stay visible
    up = 2
    img = cv2.resize(img, (img.shape[1] * up, img.shape[0] * up), interpolation=cv2.INTER_NEAREST)
    s = scale * up
    sel = cand["selected"].to_numpy() if "selected" in cand.columns else np.zeros(cand.height, bool)
    x, y = cand["x"].to_numpy(), cand["y"].to_numpy()
    x0, y0 = (x * s).astype(np.int64), (y * s).astype(np.int64)
    x1, y1 = ((x + footprint) * s).astype(np.int64) - 1, ((y + footprint) * s).astype(np.int64) - 1
    # candidates (yellow, 1 px), then the selected tiles on top (green, 2 px)
    for chosen, color, width in ((False, (230, 200, 0), 1), (True, (0, 200, 0), 2)):
        m = sel == chosen
        draw_boxes(img, x0[m], y0[m], x1[m], y1[m], color, width)
    return img


def draw_boxes(img: np.ndarray, x0, y0, x1, y1, color: tuple, width: int) -> None:
    """Outline the boxes with corners (x0[i], y0[i]) and (x1[i], y1[i]) (picture pixels, inclusive)
    in one OpenCV call; the same pixels as ``cv2.rectangle`` box by box."""
    if len(x0):
        corners = np.stack([x0, y0, x1, y0, x1, y1, x0, y1], 1).astype(np.int32).reshape(-1, 4, 2)
        cv2.polylines(img, list(corners), True, color, width)


def write_slide_qc(files: DetectFiles, cand: pl.DataFrame, facts: SlideFacts, path: Path) -> None:
    """Write ``qc/{slide_id}.png`` from the cached thumbnail and mask of the detect phase."""
    thumb = decode_png(files.thumb.read_bytes())
    mask = decode_png(files.mask.read_bytes())[..., 0] > 127
    pic = overlay_tiles(thumb, mask, cand, float(facts.footprint), int(facts.width))
    atomic_write_bytes(path, encode_png(pic), durable=False)
