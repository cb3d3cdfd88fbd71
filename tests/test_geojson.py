"""QuPath GeoJSON export of a tile run: tissue contours and every candidate tile by its fate."""

from __future__ import annotations

import json

import polars as pl

from conftest import tile_two_slides
from cytosyn_data.cli import main


def test_geojson_per_slide_has_tissue_and_every_tile_by_fate(tmp_path, cmu_slide, tcga_slide):
    run = tile_two_slides(tmp_path, cmu_slide, tcga_slide, "40")
    assert main(["split", "--run", str(run), "--val-in-fraction", "0.2", "--guidance-tiles", "4", "--shard-size", "8"]) == 0
    assert main(["export-geojson", "--run", str(run)]) == 0
    slides = pl.read_parquet(run / "slides.parquet")
    cand, tiles = pl.read_parquet(run / "candidates.parquet"), pl.read_parquet(run / "tiles.parquet")
    splits = pl.read_parquet(run / "splits.parquet")
    for s in slides.iter_rows(named=True):
        doc = json.loads((run / "geojson" / f"{s['slide_id']}.geojson").read_text())
        assert doc["type"] == "FeatureCollection"
        kinds = [f["properties"]["objectType"] for f in doc["features"]]
        assert "annotation" in kinds  # the tissue
        boxes = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
        assert len(boxes) == cand.filter(pl.col("slide_id") == s["slide_id"]).height  # every candidate
        fates = {f["properties"]["name"]: f["properties"]["classification"]["name"] for f in boxes}
        mine = splits.filter(pl.col("slide_id") == s["slide_id"])
        for row in mine.iter_rows(named=True):
            assert fates[row["key"]] == ("guidance" if row["guidance"] else row["split"])
        unselected = set(cand.filter(pl.col("slide_id") == s["slide_id"])["key"]) - set(tiles["key"])
        assert {k for k, v in fates.items() if v == "candidate"} == unselected
        for f in doc["features"]:
            for x, y in f["geometry"]["coordinates"][0]:
                assert -1 <= x <= s["width"] + 1 and -1 <= y <= s["height"] + 1
        ring = next(f for f in boxes if f["properties"]["name"] in set(mine["key"]))["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 5


def test_fates_in_slide_batches_equal_the_whole_run(tmp_path, cmu_slide, tcga_slide):
    from cytosyn_data.reports.geojson import fates_by_slide, tile_fates

    run = tile_two_slides(tmp_path, cmu_slide, tcga_slide, "40")
    assert main(["split", "--run", str(run), "--val-in-fraction", "0.2", "--guidance-tiles", "4", "--shard-size", "8"]) == 0
    slides = pl.read_parquet(run / "slides.parquet").sort("slide_id")
    whole = tile_fates(run).sort("key")
    for batch in (1, 10**9):  # one slide per batch, every slide in one batch
        got = pl.concat([f for _, f in fates_by_slide(run, slides, max_candidates=batch)]).sort("key")
        assert got.equals(whole) and whole.height == pl.read_parquet(run / "candidates.parquet").height


def test_tissue_outlines_are_valid_polygons_with_their_holes(tmp_path, cmu_slide, tcga_slide):
    """Corner touches, one-pixel spurs and holes of the mask: valid shapely polygons, holes kept."""
    import numpy as np
    import shapely
    from shapely.geometry import shape

    from cytosyn_data.reports.geojson import tissue_polygons

    m = np.zeros((80, 80), bool)
    m[5:40, 5:40] = True
    m[15:25, 15:25] = False  # a hole
    m[18:22, 18:22] = True  # an island in the hole
    m[40:50, 40:50] = True  # touches the first square at one corner
    m[10, 40:47] = True  # a one-pixel spur
    m[60:70, 5:15] = True
    m[65, 15:20] = True  # another spur, then a diagonal pixel chain
    for i in range(6):
        m[70 + i, 20 + i] = True
    polys = [shape({"type": "Polygon", "coordinates": p}) for p in tissue_polygons(m, 800)]
    assert all(p.is_valid for p in polys), [shapely.is_valid_reason(p) for p in polys]
    assert sum(len(p.interiors) for p in polys) == 1  # the hole is exported
    union = shapely.union_all(polys)
    assert abs(union.area / 100 - m.sum()) / m.sum() < 0.25  # the traced area is the mask's (pixel centres)
    assert union.contains(shapely.Point(200, 200)) and not union.contains(shapely.Point(165, 165))  # island, hole

    run = tile_two_slides(tmp_path, cmu_slide, tcga_slide, "20")
    assert main(["export-geojson", "--run", str(run)]) == 0
    for path in (run / "geojson").glob("*.geojson"):
        for f in json.loads(path.read_text())["features"]:
            g = shape(f["geometry"])
            assert g.is_valid, (path.name, f["properties"].get("name"), shapely.is_valid_reason(g))


def test_paquo_takes_our_features_and_gives_regions_back(tmp_path, cmu_slide):
    """paquo (bayer-science-for-a-better-life/paquo f863af5, paquo/hierarchy.py): ``load_geojson``
    requires a list of features and makes each an annotation, trying ``shape(geometry).is_valid``
    only with ``fix_invalid``; ``to_geojson`` returns the annotations as a list of QuPath features.
    Our tissue features pass without fixing; the list paquo gives back is a region file."""
    from shapely.geometry import shape

    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "a"), "--tiles", "all"]) == 0
    assert main(["export-geojson", "--run", str(tmp_path / "a")]) == 0
    doc = json.loads((tmp_path / "a" / "geojson" / "cmu-1-small-region.geojson").read_text())
    tissue = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]  # what to give load_geojson
    assert isinstance(tissue, list) and tissue
    for annotation in tissue:  # load_geojson's lines, fix_invalid=False and True
        assert shape(annotation["geometry"]).is_valid
        assert annotation["properties"].get("classification", {}).get("name", "UNDEFINED") == "tissue"
    # hierarchy.to_geojson(): every annotation (tile boxes too, had they been loaded) as a plain list
    back = [{"type": "Feature", "id": "5c5b6c52-1a0c-4a4a-9d4f-0a0a0a0a0a0a", "geometry": f["geometry"],
             "properties": {"objectType": "annotation", "classification": f["properties"]["classification"]}}
            for f in doc["features"]]
    regions = tmp_path / "regions"
    regions.mkdir()
    (regions / "cmu-1-small-region.geojson").write_text(json.dumps(back))
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "b"), "--tiles", "all",
                 "--include-regions", str(regions), "--region-class", "tissue"]) == 0
    a = set(pl.read_parquet(tmp_path / "a" / "candidates.parquet")["key"])
    b = set(pl.read_parquet(tmp_path / "b" / "candidates.parquet")["key"])
    assert len(a ^ b) <= 2 and len(a & b) >= len(a) - 2
