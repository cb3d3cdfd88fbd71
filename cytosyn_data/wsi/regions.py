"""Regions drawn by a person (QuPath annotations exported as GeoJSON) that restrict or exclude tiling.

A region file is GeoJSON in level-0 pixels - a FeatureCollection, a Feature, a bare geometry or a
list of features (QuPath's "Export objects as GeoJSON") - whose Polygon and MultiPolygon geometries
(holes included) are the regions; other geometry types (points, lines) are ignored. Only QuPath
*annotations* are regions: detections, cells and tiles (a QuPath "All objects" export of our own
GeoJSON carries the tile boxes as detections) are left out and counted in the log; with
``--region-class NAME`` only annotations of that classification count (a pathologist's "Tumor" or
"Exclude" layer). The union of the polygons is rasterised, each polygon's holes cleared inside it
only, so the order of the polygons in the file does not matter. With
``--include-regions DIR`` tissue outside ``DIR/{slide_id}.geojson``'s regions is not tissue (a slide
without a file is not restricted); with ``--exclude-regions DIR`` tissue inside them is not tissue.
The regions act on the tissue mask, so candidates follow from the usual ``tissue_threshold``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
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


#: QuPath object types that are not regions (objectType, or v0.2's legacy ``id``): tiles, cells,
#: detections and TMA cores; everything else - "annotation", none given, unknown - QuPath imports as
#: an annotation (qupath/qupath e7662d8, qupath-core/.../io/QuPathTypeAdapters.java, parseObject)
NOT_REGIONS = {"detection": "detection", "PathDetectionObject": "detection", "cell": "cell", "PathCellObject": "cell",
               "tile": "tile", "PathTileObject": "tile", "tmaCore": "tmaCore", "tma_core": "tmaCore",
               "TMACoreObject": "tmaCore", "root": "root", "PathRootObject": "root"}


def _features(obj) -> list[tuple[dict, dict]]:
    """(geometry, properties) of every feature; a bare geometry has no properties."""
    if isinstance(obj, list):
        return [f for o in obj for f in _features(o)]
    if not isinstance(obj, dict):
        return []
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return _features(obj.get("features", []))
    if kind == "Feature":
        props = dict(obj.get("properties") or {})
        if "id" in obj and str(obj["id"]) in NOT_REGIONS or obj.get("id") == "PathAnnotationObject":
            props.setdefault("objectType", obj["id"])  # QuPath v0.2 kept the type in the id
        return [(g, props) for g, _ in _features(obj.get("geometry"))]
    if kind == "GeometryCollection":
        return [f for g in obj.get("geometries", []) for f in _features(g)]
    return [(obj, {})] if kind in ("Polygon", "MultiPolygon") else []


def object_type(props: dict) -> str:
    """QuPath's object type of a feature's properties (``annotation`` when none is given)."""
    for key in ("objectType", "object_type", "type"):
        if isinstance(props.get(key), str):
            return NOT_REGIONS.get(props[key], "annotation")
    return "annotation"


def class_name(props: dict) -> str | None:
    """QuPath's classification of a feature: ``{"name": "Tumor"}``, or a derived class
    ``{"names": ["Tumor", "Positive"]}`` as "Tumor: Positive"; None when unclassified."""
    c = props.get("classification")
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        if isinstance(c.get("name"), str):
            return c["name"]
        if isinstance(c.get("names"), list):
            return ": ".join(map(str, c["names"]))
    return None


@dataclass(frozen=True)
class Regions:
    """The polygons of a region file (each a list of rings [n, 2] float64 in level-0 pixels, the first
    the outline, the rest holes) and what was left out: ``skipped`` counts features by reason."""

    polygons: list
    skipped: dict

    def note(self, path: str) -> str | None:
        """One line for the log when something was left out, else None."""
        if not self.skipped:
            return None
        return f"{path}: {len(self.polygons)} region(s); left out " + ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))


def _load_json(path: str | Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SlideError(f"{path}: cannot read the region file ({type(exc).__name__}: {exc})") from None


def read_regions(path: str | Path, region_class: str | None = None) -> Regions:
    """The regions of a GeoJSON file: QuPath annotations only (detections, cells, tiles are left out
    and counted), and with ``region_class`` only annotations of that classification."""
    polygons, skipped, classes = [], Counter(), Counter()
    for g, props in _features(_load_json(path)):
        kind, cls = object_type(props), class_name(props)
        if kind != "annotation":
            skipped[f"{kind}(s)"] += 1
            continue
        classes[cls or "(unclassified)"] += 1
        if region_class is not None and cls != region_class:
            skipped[f"annotation(s) not of class {region_class!r}"] += 1
            continue
        polygons += _polygon_rings(g, path)
    if not polygons:
        what = f"annotations of class {region_class!r} (classes here: {dict(classes)})" if region_class else "annotations"
        raise SlideError(f"{path}: no Polygon or MultiPolygon {what} in this GeoJSON")
    return Regions(polygons, dict(skipped))


def _polygon_rings(g: dict, path) -> list[list[np.ndarray]]:
    coords = g.get("coordinates") or []
    out = []
    for poly in (coords if g["type"] == "MultiPolygon" else [coords]):
        try:
            rings = [np.asarray(r, dtype=np.float64)[:, :2] for r in poly]
        except (TypeError, ValueError, IndexError):
            raise SlideError(f"{path}: a {g['type']} has malformed coordinates") from None
        if rings and all(len(r) >= 3 for r in rings):
            out.append(rings)
    return out


def region_mask(polygons: list[list[np.ndarray]], shape: tuple[int, int], level0_width: int) -> np.ndarray:
    """Boolean mask [h, w] (a raster over the whole slide) of the union of the polygons, each one's
    holes cleared inside that polygon only: the order of the polygons does not matter (an island
    drawn inside another polygon's hole stays)."""
    scale = shape[1] / level0_width
    out = np.zeros(shape, bool)
    for rings in polygons:
        pts = [np.round(r * scale).astype(np.int32) for r in rings]
        x0, y0 = np.maximum(pts[0].min(0), 0)
        x1, y1 = np.minimum(pts[0].max(0) + 1, (shape[1], shape[0]))
        if x1 <= x0 or y1 <= y0:
            continue
        one = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(one, [pts[0]], 1, offset=(-int(x0), -int(y0)))
        if len(pts) > 1:
            cv2.fillPoly(one, pts[1:], 0, offset=(-int(x0), -int(y0)))
        out[y0:y1, x0:x1] |= one > 0
    return out


def apply_regions(mask: np.ndarray, level0_width: int, include: str | None, exclude: str | None,
                  region_class: str | None = None) -> tuple[np.ndarray, list[str]]:
    """The tissue mask restricted to ``include``'s regions and without ``exclude``'s (files or
    None), and a log line per file that had features left out."""
    notes = []
    for path, keep in ((include, True), (exclude, False)):
        if path:
            regions = read_regions(path, region_class)
            inside = region_mask(regions.polygons, mask.shape, level0_width)
            mask = mask & (inside if keep else ~inside)
            notes += [n for n in [regions.note(path)] if n]
    return mask, notes
