"""QuPath regions (GeoJSON in level-0 pixels) restrict or exclude tiling."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from cytosyn_data.cli import main


def _left_half(w: int, h: int) -> dict:
    ring = [[0, 0], [w // 2, 0], [w // 2, h], [0, h], [0, 0]]
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}}]}


def test_include_and_exclude_regions_split_the_candidates(tmp_path, cmu_slide):
    base = ["tile", "--slides", str(cmu_slide), "--tiles", "all"]
    assert main(base + ["--out", str(tmp_path / "all")]) == 0
    everything = pl.read_parquet(tmp_path / "all" / "candidates.parquet")
    w = int(pl.read_parquet(tmp_path / "all" / "slides.parquet")["width"][0])
    regions = tmp_path / "regions"
    regions.mkdir()
    (regions / "cmu-1-small-region.geojson").write_text(json.dumps(_left_half(2220, 2967)))
    assert main(base + ["--out", str(tmp_path / "in"), "--include-regions", str(regions)]) == 0
    assert main(base + ["--out", str(tmp_path / "ex"), "--exclude-regions", str(regions)]) == 0
    inside = pl.read_parquet(tmp_path / "in" / "candidates.parquet")
    outside = pl.read_parquet(tmp_path / "ex" / "candidates.parquet")
    fp = float(pl.read_parquet(tmp_path / "all" / "slides.parquet")["footprint"][0])
    # a candidate needs >= 60% tissue inside its square: its centre lies on the kept side of x = w/2
    assert inside.height > 0 and outside.height > 0 and w == 2220
    assert (inside["x"] + fp / 2 <= w / 2 + fp * 0.1).all() and (outside["x"] + fp / 2 >= w / 2 - fp * 0.1).all()
    assert set(inside["key"]) | set(outside["key"]) <= set(everything["key"])
    assert not set(inside["key"]) & set(outside["key"])
    assert np.isclose(inside.height + outside.height, everything.height, atol=3)


def test_exported_tissue_reimported_as_include_keeps_the_candidates(tmp_path, cmu_slide):
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "a"), "--tiles", "all"]) == 0
    assert main(["export-geojson", "--run", str(tmp_path / "a")]) == 0
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "b"), "--tiles", "all",
                 "--include-regions", str(tmp_path / "a" / "geojson")]) == 0
    a = set(pl.read_parquet(tmp_path / "a" / "candidates.parquet")["key"])
    b = set(pl.read_parquet(tmp_path / "b" / "candidates.parquet")["key"])
    assert len(a ^ b) <= 2 and len(a & b) >= len(a) - 2  # the traced contour re-rasterised


def test_a_bad_region_file_fails_that_slide_with_its_name(tmp_path, cmu_slide, capsys):
    regions = tmp_path / "r"
    regions.mkdir()
    (regions / "cmu-1-small-region.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "o"), "--include-regions", str(regions)]) == 1
    err = pl.read_parquet(tmp_path / "o" / "slides.parquet")["error"][0]
    assert "cmu-1-small-region.geojson: no Polygon or MultiPolygon annotations in this GeoJSON" in err
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "p"), "--include-regions",
                 str(regions / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


def _square(x0, y0, side, holes=(), object_type="annotation", cls=None, legacy=False):
    ring = lambda x, y, a: [[x, y], [x + a, y], [x + a, y + a], [x, y + a], [x, y]]  # noqa: E731
    props = {} if legacy else {"objectType": object_type}
    if cls:
        props["classification"] = {"name": cls, "color": [200, 0, 0]}
    f = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring(x0, y0, side)] + [ring(*h) for h in holes]},
         "properties": props}
    if legacy:  # QuPath v0.2 kept the object type in the feature's id
        f["id"] = {"annotation": "PathAnnotationObject", "detection": "PathDetectionObject"}[object_type]
    return f


def test_regions_are_the_union_whatever_the_order():
    """An island drawn inside another polygon's hole stays, listed first or last."""
    from cytosyn_data.wsi.regions import read_regions, region_mask

    frame = _square(0, 0, 1000, holes=[(200, 200, 600)])
    island = _square(400, 400, 200)
    masks = []
    for order in ([frame, island], [island, frame]):
        path = __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "r.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": order}))
        masks.append(region_mask(read_regions(path).polygons, (100, 100), 1000))
    assert np.array_equal(masks[0], masks[1])
    m = masks[0]
    assert m[5, 5] and not m[30, 30] and m[50, 50]  # frame, hole, island


def test_only_annotations_are_regions_and_region_class_picks_a_layer(tmp_path, cmu_slide, capsys):
    """QuPath's "All objects" export of our own GeoJSON after trimming the tissue: the tile
    detections it carries are left out (counted in the log), so the trim takes effect."""
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "a"), "--tiles", "all"]) == 0
    assert main(["export-geojson", "--run", str(tmp_path / "a")]) == 0
    doc = json.loads((tmp_path / "a" / "geojson" / "cmu-1-small-region.geojson").read_text())
    n_det = sum(f["properties"]["objectType"] == "detection" for f in doc["features"])
    trimmed = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
    trimmed.append(_square(0, 0, 1110, cls="tissue"))  # the pathologist's trimmed tissue: the top-left part
    trimmed[0:0] = [_square(1200, 1200, 900, cls="Tumor"), _square(0, 2000, 900, object_type="detection", legacy=True)]
    regions = tmp_path / "regions"
    regions.mkdir()
    (regions / "cmu-1-small-region.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": trimmed}))
    capsys.readouterr()
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "b"), "--tiles", "all",
                 "--include-regions", str(regions)]) == 0
    log = capsys.readouterr()
    assert f"left out {n_det + 1} detection(s)" in log.out + log.err
    b = pl.read_parquet(tmp_path / "b" / "candidates.parquet")
    everything = pl.read_parquet(tmp_path / "a" / "candidates.parquet")
    assert 0 < b.height < everything.height
    in_tissue = (b["x"] < 1110) & (b["y"] < 1110)  # a tile's square overlaps the trimmed tissue or the Tumor square
    assert (in_tissue | ((b["x"] + 224 > 1200) & (b["y"] + 224 > 1200))).all() and in_tissue.any()
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "c"), "--tiles", "all",
                 "--include-regions", str(regions), "--region-class", "Tumor"]) == 0
    c = pl.read_parquet(tmp_path / "c" / "candidates.parquet")
    assert c.height > 0 and (c["x"] + 224 > 1200).all() and (c["y"] + 224 > 1200).all()
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "d"), "--tiles", "all",
                 "--include-regions", str(regions), "--region-class", "Stroma"]) == 1
    err = pl.read_parquet(tmp_path / "d" / "slides.parquet")["error"][0]
    assert "no Polygon or MultiPolygon annotations of class 'Stroma' (classes here: {'Tumor': 1, 'tissue': 1})" in err
