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
    assert "cmu-1-small-region.geojson: no Polygon or MultiPolygon regions in this GeoJSON" in err
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "p"), "--include-regions",
                 str(regions / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
