"""The per-tile kernel of the tile stage: read one window, resample, encode PNG, measure QC.

A reader is opened once per slide segment (:func:`open_reader`): the fast TIFF reader when
detection found one (its cache holds a whole row band of the read level, so reading the tiles
row-major decodes each source JPEG tile once per pass; a segment boundary inside a band costs
one extra decode of that band's tiles), else the openslide/tiffslide handle.

QC measures of the written 224 x 224 tile (:data:`QC_SCHEMA`), cheap enough for every tile (blur
on the tile area-averaged to 112 x 112, 1 micron per pixel; the colour measures to 56 x 56, 2
microns per pixel):

- ``qc_tissue``: fraction of pixels with HSV saturation > 20 and value >= 30 (0-1);
- ``qc_blur``: variance of the 3 x 3 Laplacian of the grey image at 1 micron per pixel (grey
  levels squared; low = blurred or empty);
- ``qc_saturation``, ``qc_brightness``: mean HSV saturation and value (0-255);
- ``qc_pen``: fraction of pixels matching the pen-ink rules of :func:`tissue.pen_mask` (0-1).
"""

from __future__ import annotations

import cv2
import numpy as np
import polars as pl

from .png import encode_png
from .tissue import pen_mask
from .wsi import ReadPlan, level_pixel, open_slide, resize_to_tile

QC_SCHEMA = {
    "qc_tissue": pl.Float32,
    "qc_blur": pl.Float32,
    "qc_saturation": pl.Float32,
    "qc_brightness": pl.Float32,
    "qc_pen": pl.Float32,
}


def tile_qc(rgb: np.ndarray) -> tuple[float, float, float, float, float]:
    """QC measures of an RGB uint8 tile, in the order of :data:`QC_SCHEMA`: blur on the tile
    area-averaged to half its side (1 micron per pixel at 0.5 MPP), the colour measures to a
    quarter (2 microns per pixel); together a small fraction of the tile's cost."""
    h, w = rgb.shape[:2]
    half = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(half, cv2.COLOR_RGB2GRAY)
    blur = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S, ksize=1))[1][0, 0] ** 2  # exact: |lap| <= 1020
    small = cv2.resize(half, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV_FULL)
    tissue = cv2.countNonZero(cv2.inRange(hsv, (0, 21, 30), (255, 255, 255))) / (hsv.shape[0] * hsv.shape[1])
    pen = np.count_nonzero(pen_mask(small)) / (hsv.shape[0] * hsv.shape[1])
    _, mean_sat, mean_val, _ = cv2.mean(hsv)
    return float(tissue), float(blur), float(mean_sat), float(mean_val), float(pen)


class _TiffOnly:
    """``read_rgb`` of a slide backed by the TIFF reader alone (skips opening openslide)."""

    def __init__(self, info: dict):
        from .tiff_reader import TiledTiffReader

        self._r = TiledTiffReader(info["path"], [tuple(d) for d in info["level_dimensions"]])
        self._r.hold_band(int(info["read_level"]), int(info["region"]))
        self._ds = info["level_downsamples"]

    @property
    def decoded(self) -> int:
        """TIFF tiles decoded so far (each once per band pass: see TiledTiffReader.hold_band)."""
        return self._r.decoded

    def read_rgb(self, location, level, size):
        lx, ly = level_pixel(location, self._ds[level])
        return self._r.read(level, lx, ly, size[0], size[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._r.close()


def open_reader(info: dict):
    """A context-managed reader with ``read_rgb((x, y), level, (w, h))`` for a detected slide."""
    if info.get("fast_reads"):
        return _TiffOnly(info)
    return open_slide(info["path"])


def plan_from_info(info: dict, tile_size: int, target_mpp: float, resample: str) -> ReadPlan:
    """The read plan detection chose for a slide (``work/detect/{slide_id}.json``)."""
    return ReadPlan(
        level=int(info["read_level"]),
        level_mpp=float(info["level_mpp"]),
        downsample=float(info["downsample"]),
        region=int(info["region"]),
        tile_size=tile_size,
        target_mpp=target_mpp,
        native=bool(info["native"]),
        resample=resample,
    )


def render_tile(reader, x: int, y: int, plan: ReadPlan, encoder: str) -> tuple[bytes, tuple]:
    """PNG bytes and QC measures of the tile whose top-left level-0 pixel is (x, y)."""
    r = plan.region
    tile = resize_to_tile(reader.read_rgb((x, y), plan.level, (r, r)), plan)
    return encode_png(tile, encoder), tile_qc(tile)
