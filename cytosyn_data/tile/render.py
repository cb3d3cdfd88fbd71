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

from cytosyn_data.io.png import encode_png
from cytosyn_data.run.records import SlideRead
from cytosyn_data.wsi.slide import ReadPlan, load_wsi, resize_to_tile
from cytosyn_data.wsi.tissue import pen_mask


def tile_qc(rgb: np.ndarray) -> tuple[float, float, float, float, float]:
    """QC measures of one RGB uint8 tile [h, w, 3], in the order of :data:`QC_SCHEMA`."""
    return tuple(float(v) for v in tiles_qc(rgb[None])[0])


def tiles_qc(tiles: np.ndarray) -> np.ndarray:
    """QC measures of RGB uint8 tiles [n, h, w, 3] -> float64 [n, 5] (:data:`QC_SCHEMA`)."""
    return qc_of_halves(np.stack([half_tile(t) for t in tiles]))


def half_tile(tile: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A tile [h, w, 3] area-averaged to [h // 2, w // 2, 3]: the image the QC measures start from
    (1 micron per pixel at 0.5 MPP); ``out`` receives it when given."""
    h, w = tile.shape[:2]
    return cv2.resize(tile, (w // 2, h // 2), dst=out, interpolation=cv2.INTER_AREA)


def qc_of_halves(halves: np.ndarray) -> np.ndarray:
    """QC measures from the half-size tiles [n, h2, w2, 3] (:func:`half_tile`) -> float64 [n, 5].

    Blur from the half tiles, the colour measures from them area-averaged to half again (2 microns
    per pixel). The tiles are stacked into one tall image so that each OpenCV call covers the batch
    (the calls, not the pixels, cost most on 56-px images): per-pixel conversions cannot mix tiles,
    the 2x reduction cannot either when ``h2`` is even (else the tiles go one by one), and the
    Laplacian's rows at tile seams are corrected to each tile's own reflected border. A tile's
    measures do not depend on its batch."""
    n, h2, w2, _ = halves.shape
    if n > 1 and h2 % 2:
        return np.concatenate([qc_of_halves(t[None]) for t in halves])
    stack = halves.reshape(n * h2, w2, 3)
    grey = cv2.cvtColor(stack, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(stack, (w2 // 2, n * (h2 // 2)), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV_FULL)
    px = (h2 // 2) * (w2 // 2)
    out = np.empty((n, 5))
    out[:, 0] = _per_tile_count(cv2.inRange(hsv, *_TISSUE_HSV), n) / px
    out[:, 1] = _laplacian_variance(grey.reshape(n, h2, w2))
    out[:, 2] = hsv[..., 1].reshape(n, -1).sum(1, dtype=np.int64) / px
    out[:, 3] = hsv[..., 2].reshape(n, -1).sum(1, dtype=np.int64) / px
    out[:, 4] = _per_tile_count(pen_mask(small, hsv=hsv), n) / px
    return out


def _per_tile_count(mask: np.ndarray, n: int) -> np.ndarray:
    return np.count_nonzero(mask.reshape(n, -1), axis=1)


def _laplacian_variance(grey: np.ndarray) -> np.ndarray:
    """Variance of ``cv2.Laplacian(ksize=1)`` (4-neighbour, reflected border) of each image of
    grey [n, h, w] uint8 (grey levels squared; exact: |Laplacian| <= 1020). One call over the
    stack; a tile's first and last rows saw the neighbouring tile's row instead of its own
    reflected one (row 1 / row h - 2), which is added back here."""
    n, h, w = grey.shape
    lap = cv2.Laplacian(grey.reshape(n * h, w), cv2.CV_16S, ksize=1).reshape(n, h, w)
    if n > 1:
        g = grey.astype(np.int16)
        lap[1:, 0] += g[1:, 1] - g[:-1, -1]
        lap[:-1, -1] += g[:-1, -2] - g[1:, 0]
    return np.array([cv2.meanStdDev(t)[1][0, 0] ** 2 for t in lap])


#: HSV bounds of a tissue pixel for ``qc_tissue``: saturation > 20, value >= 30.
_TISSUE_HSV = (np.array((0, 21, 30), np.uint8), np.array((255, 255, 255), np.uint8))


def open_reader(info: SlideRead):
    """A context-managed reader with ``read_rgb((x, y), level, (w, h))`` for a detected slide: the
    fast TIFF reader alone when detection found the file readable so (holding one row band of the
    read level), else openslide / tiffslide."""
    if info.fast_reads:
        return load_wsi(info.path, "tiff", level_dimensions=info.level_dimensions,
                        level_downsamples=info.level_downsamples, band=(int(info.read_level), int(info.region)))
    return load_wsi(info.path)


def plan_from_info(info: SlideRead, tile_size: int, target_mpp: float, resample: str) -> ReadPlan:
    """The read plan detection chose for a slide (``work/detect/{slide_id}.json``)."""
    return ReadPlan(
        level=int(info.read_level),
        level_mpp=float(info.level_mpp),
        downsample=float(info.downsample),
        region=int(info.region),
        tile_size=tile_size,
        target_mpp=target_mpp,
        native=bool(info.native),
        resample=resample,
    )


def render_tiles(reader, xs: list[int], ys: list[int], plan: ReadPlan, encoder: str) -> tuple[list[bytes], np.ndarray]:
    """PNG bytes of the tiles whose top-left level-0 pixels are (xs[i], ys[i]), and their QC
    measures float64 [n, 5] (:data:`QC_SCHEMA`), taken together once the batch is read. Each tile
    is halved for the QC right after its PNG, while it is still in the CPU cache."""
    r, t = plan.region, plan.tile_size
    halves = np.empty((len(xs), t // 2, t // 2, 3), np.uint8)
    pngs = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        tile = resize_to_tile(reader.read_rgb((x, y), plan.level, (r, r)), plan)
        pngs.append(encode_png(tile, encoder))
        half_tile(tile, out=halves[i])
    return pngs, qc_of_halves(halves)
