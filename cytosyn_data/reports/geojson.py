"""QuPath-compatible GeoJSON of a tile run: per slide, the tissue contours and every tile box in
level-0 pixels, each tile classified by its fate.

``export_geojson(run)`` writes ``RUN/geojson/{slide_id}.geojson``: a FeatureCollection whose
features are ``annotation`` polygons for the tissue (from the detect mask, traced with OpenCV with
its holes, made valid with shapely, scaled to level-0 pixels) and ``detection`` polygons for the tiles (the level-0 square actually
read), classified ``train`` / ``val_in`` / ``val_out`` / ``guidance`` (when ``splits.parquet``
exists), ``removed`` (curation keep = false), ``tile`` (written, no split yet) or ``candidate``
(a tissue tile not selected). QuPath opens it with File > Import objects.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import shapely
import shapely.affinity
import shapely.geometry
from shapely.geometry import MultiPolygon, Polygon
from shapely.ops import unary_union

from cytosyn_data.core.errors import DataError
from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.io.png import decode_png
from cytosyn_data.run.paths import DetectFiles
from cytosyn_data.run.schemas import WINDOW_COLUMNS, read_windows

#: QuPath classification colours (RGB)
COLOURS = {"tissue": (0, 160, 0), "train": (40, 110, 255), "val_in": (255, 170, 0), "val_out": (220, 40, 40),
           "guidance": (150, 60, 220), "removed": (90, 90, 90), "tile": (40, 110, 255), "candidate": (200, 200, 120)}


def _props(kind: str, cls: str, name: str | None) -> dict:
    props = {"objectType": kind, "classification": {"name": cls, "color": list(COLOURS[cls])}}
    if name:
        props["name"] = name
    return props


def _feature(ring: list[list[float]], kind: str, cls: str, name: str | None = None) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": _props(kind, cls, name)}


def _box(x0: float, y0: float, side: float) -> list[list[float]]:
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def tissue_geometries(mask: np.ndarray, level0_width: int) -> list[Polygon]:
    """The tissue of a boolean mask [h, w] as valid shapely Polygons with their holes, in level-0
    pixels (one per connected piece). Traced with OpenCV (outlines and holes through the boundary
    pixels' centres, hierarchy kept), then made valid: corner touches and one-pixel spurs, which make
    a traced ring cross itself, are resolved by ``shapely.make_valid`` and only areas are kept."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    shells = []
    for i, c in enumerate(contours):
        if hierarchy[0][i][3] >= 0 or len(c) < 3:  # a hole (has a parent), or too short for an area
            continue
        holes, j = [], hierarchy[0][i][2]  # first child, then its siblings
        while j >= 0:
            if len(contours[j]) >= 3:
                holes.append(contours[j][:, 0, :].astype(float))
            j = hierarchy[0][j][0]
        shells.append(Polygon(c[:, 0, :].astype(float), holes))
    if not shells:
        return []
    area = unary_union([_areas(shapely.make_valid(s)) for s in shells])
    area = shapely.affinity.scale(area, level0_width / mask.shape[1], level0_width / mask.shape[1], origin=(0, 0))
    return [g for g in getattr(area, "geoms", [area]) if isinstance(g, Polygon) and not g.is_empty]


def _areas(geom):
    """The polygonal part of a geometry (make_valid may add the lines of a spur)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    return unary_union([g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))])


def tissue_polygons(mask: np.ndarray, level0_width: int) -> list[list[list[list[float]]]]:
    """GeoJSON Polygon coordinates (outline, then holes; closed rings in level-0 pixels) of :func:`tissue_geometries`."""
    return [shapely.geometry.mapping(shapely.geometry.polygon.orient(g))["coordinates"]
            for g in tissue_geometries(mask, level0_width)]


def _tissue_feature(rings) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in r] for r in rings]},
            "properties": _props("annotation", "tissue", "tissue")}


def tile_fates(run: Path, slide_ids: list[str] | None = None) -> pl.DataFrame:
    """key, slide_id, x0, y0 (level-0 corner of the read window), side, fate: every candidate of the
    slides ``slide_ids`` (all when None). The run's tables are scanned with that filter; splits and
    curation are joined on the tiles' keys, so only these slides' rows are ever held."""
    only = pl.col("slide_id").is_in(slide_ids) if slide_ids is not None else pl.lit(True)
    tiles = pl.scan_parquet(run / "tiles.parquet").filter(only).select(WINDOW_COLUMNS).collect()
    cand = pl.scan_parquet(run / "candidates.parquet").filter(only).select("key", "slide_id", "x", "y")
    keys = tiles.lazy().select("key")
    fate = tiles.select("key", fate=pl.lit("tile"))
    if (run / "splits.parquet").exists():
        s = pl.scan_parquet(run / "splits.parquet").join(keys, on="key", how="semi").collect()
        fate = fate.join(s.select("key", split=pl.when(pl.col("guidance")).then(pl.lit("guidance"))
                                  .otherwise(pl.col("split"))), on="key", how="left")
        fate = fate.select("key", fate=pl.coalesce("split", pl.lit("removed")))
    if (run / "curation.parquet").exists():
        removed = pl.scan_parquet(run / "curation.parquet").filter(~pl.col("keep")).join(keys, on="key", how="semi")
        removed = removed.select("key").collect()["key"]
        fate = fate.with_columns(fate=pl.when(pl.col("key").is_in(removed.implode())).then(pl.lit("removed"))
                                 .otherwise(pl.col("fate")))
    windows = read_windows(tiles).select("key", "slide_id", "x0", "y0", side=pl.col("x1") - pl.col("x0")).collect()
    written = windows.join(fate, on="key")
    footprint = pl.read_parquet(run / "slides.parquet").select("slide_id", "footprint")
    others = (cand.join(keys, on="key", how="anti").join(footprint.lazy(), on="slide_id")
              .select("key", "slide_id", x0=pl.col("x").cast(pl.Float64), y0=pl.col("y").cast(pl.Float64),
                      side=pl.col("footprint"), fate=pl.lit("candidate")).collect())
    return pl.concat([written, others], how="vertical_relaxed")


def fates_by_slide(run: Path, slides: pl.DataFrame, max_candidates: int = 1_000_000):
    """(slide row, its fates) for the ok slides of ``slides`` in order, computed for batches of slides
    of about ``max_candidates`` candidates: memory is one batch, not the run."""
    ok = slides.filter(pl.col("status") == "ok")
    batch, n = [], 0
    rows = ok.to_dicts()
    for i, row in enumerate(rows):
        batch.append(row)
        n += int(row.get("n_candidates") or 0)
        if n >= max_candidates or i == len(rows) - 1:
            fates = tile_fates(run, [r["slide_id"] for r in batch]).partition_by("slide_id", as_dict=True)
            empty = pl.DataFrame(schema={"key": pl.String, "slide_id": pl.String, "x0": pl.Float64, "y0": pl.Float64,
                                         "side": pl.Float64, "fate": pl.String})
            for r in batch:
                yield r, fates.get((r["slide_id"],), empty)
            batch, n = [], 0


def export_geojson(run: str | Path) -> list[Path]:
    """Write ``RUN/geojson/{slide_id}.geojson`` for every slide that was detected; returns the paths."""
    run = Path(run)
    for need in ("slides.parquet", "tiles.parquet", "candidates.parquet"):
        if not (run / need).exists():
            raise DataError(f"{run / need}: not found; is {run} a finished tile run?")
    written = []
    for slide, part in fates_by_slide(run, pl.read_parquet(run / "slides.parquet")):
        sid = slide["slide_id"]
        feats = []
        mask_path = DetectFiles.of_run(run, sid).mask
        if mask_path.exists():
            mask = decode_png(mask_path.read_bytes())[..., 0] > 127
            feats += [_tissue_feature(r) for r in tissue_polygons(mask, int(slide["width"]))]
        for t in part.sort("key").iter_rows(named=True):
            feats.append(_feature(_box(t["x0"], t["y0"], t["side"]), "detection", t["fate"], t["key"]))
        path = run / "geojson" / f"{sid}.geojson"
        atomic_write_bytes(path, json.dumps({"type": "FeatureCollection", "features": feats}).encode(), durable=False)
        written.append(path)
    return written
