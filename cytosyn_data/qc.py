"""QC pictures: slide thumbnails with the tissue mask and the tile grid drawn on them."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import polars as pl

from .png import decode_png, encode_png
from .shards import atomic_write_bytes


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
    for x, y, chosen in zip(cand["x"].to_numpy(), cand["y"].to_numpy(), sel):
        p0 = (int(x * s), int(y * s))
        p1 = (int((x + footprint) * s) - 1, int((y + footprint) * s) - 1)
        color = (0, 200, 0) if chosen else (230, 200, 0)
        cv2.rectangle(img, p0, p1, color, 2 if chosen else 1)
    return img


def write_slide_qc(detect_dir: Path, sid: str, cand: pl.DataFrame, info: dict, path: Path) -> None:
    """Write ``qc/{slide_id}.png`` from the cached thumbnail and mask of the detect phase."""
    thumb = decode_png((detect_dir / f"{sid}.thumb.png").read_bytes())
    mask = decode_png((detect_dir / f"{sid}.mask.png").read_bytes())[..., 0] > 127
    pic = overlay_tiles(thumb, mask, cand, float(info["footprint"]), int(info["width"]))
    atomic_write_bytes(path, encode_png(pic), durable=False)
