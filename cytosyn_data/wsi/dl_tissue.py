"""Tissue masks from a deep segmentation network (``--segmenter hest|grandqc``), at the detection
thumbnail's size, so candidates, QC pictures, the GeoJSON and the report follow as with the HSV rule.

The network sees the slide at its own resolution (:class:`cytosyn_encoders.segmenters.SegmenterSpec`:
HEST 1, GrandQC 10 microns per pixel) in patches of its input size, batched, on a GPU when one is
present. When the slide at that resolution is small (up to 64 MP), it is read whole by the exact
thumbnail rule and cut into patches (the last row and column padded with glass white); else each
patch is read from the pyramid on its own (memory: one batch). Each patch's tissue prediction is
area-reduced onto the thumbnail's grid; a thumbnail pixel is tissue when at least half of it is. Pen
ink is removed as with the HSV rule (``TissueParams``).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from cytosyn_data.wsi.tissue import TissueParams, ink_mask

#: the most pixels of the slide at the network's resolution read at once (else patch by patch)
WHOLE_PIXELS = 64_000_000


def segment_tissue(slide, mpp0: float, thumb: np.ndarray, segmenter, batch_size: int = 16,
                   params: TissueParams = TissueParams()) -> np.ndarray:
    """Boolean [h, w] tissue mask on the grid of ``thumb`` (the slide's detection thumbnail) from
    ``segmenter`` (a :class:`~cytosyn_encoders.segmenters.Segmenter`); ``mpp0``: level-0 MPP."""
    w0, h0 = slide.dimensions
    th, tw = thumb.shape[:2]
    spec = segmenter.spec
    sw, sh = max(1, round(w0 * mpp0 / spec.mpp)), max(1, round(h0 * mpp0 / spec.mpp))
    if sw * sh <= WHOLE_PIXELS:
        fraction = _whole(slide.thumbnail((sw, sh)), segmenter, batch_size, (tw, th))
    else:
        fraction = _patched(slide, segmenter, batch_size, (tw, th), (sw, sh))
    tissue = fraction >= 0.5
    return tissue & ~ink_mask(thumb, mpp0 * w0 / tw, params)


def _whole(img: np.ndarray, segmenter, batch_size: int, thumb_size: tuple[int, int]) -> np.ndarray:
    """Tissue fraction on the thumbnail grid, from the slide at the network's resolution in memory."""
    s = segmenter.spec.input_size
    h, w = img.shape[:2]
    ny, nx = math.ceil(h / s), math.ceil(w / s)
    padded = np.full((ny * s, nx * s, 3), 255, np.uint8)
    padded[:h, :w] = img
    out = np.zeros((ny * s, nx * s), np.uint8)
    cells = [(i, j) for i in range(ny) for j in range(nx)]
    for k in range(0, len(cells), batch_size):
        batch = cells[k:k + batch_size]
        pred = segmenter(np.stack([padded[i * s:(i + 1) * s, j * s:(j + 1) * s] for i, j in batch]))
        for (i, j), p in zip(batch, pred):
            out[i * s:(i + 1) * s, j * s:(j + 1) * s] = p
    return cv2.resize(out[:h, :w].astype(np.float32), thumb_size, interpolation=cv2.INTER_AREA)


def _patched(slide, segmenter, batch_size: int, thumb_size: tuple[int, int], seg_size: tuple[int, int]) -> np.ndarray:
    """Tissue fraction on the thumbnail grid, each network patch read from the pyramid on its own:
    patches laid on whole thumbnail pixels (``p`` of them a side), so they tile it without seams."""
    tw, th = thumb_size
    w0, h0 = slide.dimensions
    s = segmenter.spec.input_size
    p = max(1, round(s * tw / seg_size[0]))  # thumbnail pixels per patch side
    side0 = p * w0 / tw  # level-0 pixels per patch side
    level = max([i for i, d in enumerate(slide.level_downsamples) if d <= side0 / s] or [0])
    ds = slide.level_downsamples[level]
    region = math.ceil(side0 / ds)
    out = np.zeros((math.ceil(th / p) * p, math.ceil(tw / p) * p), np.float32)
    cells = [(i, j) for i in range(math.ceil(th / p)) for j in range(math.ceil(tw / p))]
    for k in range(0, len(cells), batch_size):
        batch = cells[k:k + batch_size]
        patches = [cv2.resize(slide.read_rgb((round(j * side0), round(i * side0)), level, (region, region)), (s, s),
                              interpolation=cv2.INTER_AREA) for i, j in batch]
        for (i, j), pred in zip(batch, segmenter(np.stack(patches))):
            out[i * p:(i + 1) * p, j * p:(j + 1) * p] = cv2.resize(pred.astype(np.float32), (p, p),
                                                                   interpolation=cv2.INTER_AREA)
    return out[:th, :tw]
