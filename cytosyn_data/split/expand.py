"""Tiles expanded by ``expand_px`` per side (224 -> 256 with 16), re-read from the slide.

Same centre, same read level and resampling as the slide's recorded read plan (slides.parquet);
a square that would leave the slide is not produced.
"""

from __future__ import annotations

from typing import Iterator

import cv2
import polars as pl

from cytosyn_data.io.png import encode_png
from cytosyn_data.wsi.slide import RESAMPLE_FILTERS, open_slide


def expanded_pngs(slide: dict, tiles: pl.DataFrame, expand_px: int, tile_size: int = 224) -> Iterator[tuple[str, bytes]]:
    """(key, PNG bytes) of ``(tile_size + 2 * expand_px)`` px tiles around the tiles ``key, x, y``
    (level-0 px) of one slide, in key order. ``slide``: a slides.parquet row (path, read_level,
    footprint = tile side in level-0 px)."""
    with open_slide(slide["path"]) as s:
        level = int(slide["read_level"])
        ds = s.level_downsamples[level]
        level_fp = slide["footprint"] / ds  # tile side in level pixels
        pad_level = int(round(expand_px * level_fp / tile_size))
        size_level = int(round(level_fp)) + 2 * pad_level
        lw, lh = s.level_dimensions[level]
        target = tile_size + 2 * expand_px
        for key, x, y in tiles.sort("key").select("key", "x", "y").iter_rows():
            x0, y0 = int(round(x - pad_level * ds)), int(round(y - pad_level * ds))
            if x0 < 0 or y0 < 0 or x0 / ds + size_level > lw or y0 / ds + size_level > lh:
                continue  # the expanded square leaves the slide: not written
            region = s.read_rgb((x0, y0), level, (size_level, size_level))
            if region.shape[0] != target:
                region = cv2.resize(region, (target, target), interpolation=RESAMPLE_FILTERS["area"])
            yield key, encode_png(region)
