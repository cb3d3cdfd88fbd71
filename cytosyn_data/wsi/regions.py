"""Regions drawn by a person (QuPath annotations exported as GeoJSON) that restrict or exclude tiling.

A region file is GeoJSON in level-0 pixels - a FeatureCollection, a Feature, a bare geometry or a
list of features (QuPath's "Export objects as GeoJSON") - whose Polygon and MultiPolygon geometries
(holes included) are the regions; other geometry types (points, lines) are ignored. With
``--include-regions DIR`` tissue outside ``DIR/{slide_id}.geojson``'s regions is not tissue (a slide
without a file is not restricted); with ``--exclude-regions DIR`` tissue inside them is not tissue.
The regions act on the tissue mask, so candidates follow from the usual ``tissue_threshold``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from cytosyn_data.wsi.slide import SlideError


def region_file(folder: str | Path | None, slide_id: str) -> str | None:
    """``folder/{slide_id}.geojson`` when it exists."""
    if folder is None:
        return None
    p = Path(folder) / f"{slide_id}.geojson"
    return str(p) if p.exists() else None


def _geometries(obj) -> list[dict]:
    if isinstance(obj, list):
        return [g for o in obj for g in _geometries(o)]
    if not isinstance(obj, dict):
        return []
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return _geometries(obj.get("features", []))
    if kind == "Feature":
        return _geometries(obj.get("geometry"))
    if kind == "GeometryCollection":
        return _geometries(obj.get("geometries", []))
    return [obj] if kind in ("Polygon", "MultiPolygon") else []


def read_polygons(path: str | Path) -> list[list[np.ndarray]]:
    """Polygons (each a list of rings [n, 2] float64, the first the outline, the rest holes) in level-0 pixels."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SlideError(f"{path}: cannot read the region file ({type(exc).__name__}: {exc})") from None
    polygons = []
    for g in _geometries(obj):
        coords = g.get("coordinates") or []
        for poly in (coords if g["type"] == "MultiPolygon" else [coords]):
            try:
                rings = [np.asarray(r, dtype=np.float64)[:, :2] for r in poly]
            except (TypeError, ValueError, IndexError):
                raise SlideError(f"{path}: a {g['type']} has malformed coordinates") from None
            if rings and all(len(r) >= 3 for r in rings):
                polygons.append(rings)
    if not polygons:
        raise SlideError(f"{path}: no Polygon or MultiPolygon regions in this GeoJSON")
    return polygons


def region_mask(polygons: list[list[np.ndarray]], shape: tuple[int, int], level0_width: int) -> np.ndarray:
    """Boolean mask [h, w] (a raster over the whole slide) of the polygons' inside (holes excluded)."""
    scale = shape[1] / level0_width
    out = np.zeros(shape, np.uint8)
    for rings in polygons:
        pts = [np.round(r * scale).astype(np.int32) for r in rings]
        cv2.fillPoly(out, pts[:1], 1)
        if len(pts) > 1:
            cv2.fillPoly(out, pts[1:], 0)
    return out > 0


def apply_regions(mask: np.ndarray, level0_width: int, include: str | None, exclude: str | None) -> np.ndarray:
    """The tissue mask restricted to ``include``'s regions and without ``exclude``'s (files or None)."""
    if include:
        mask = mask & region_mask(read_polygons(include), mask.shape, level0_width)
    if exclude:
        mask = mask & ~region_mask(read_polygons(exclude), mask.shape, level0_width)
    return mask
