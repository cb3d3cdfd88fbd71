"""TRIDENT/CLAM-style coordinates: export the written tiles, tile exactly given coordinates."""

from __future__ import annotations

import h5py
import numpy as np
import openslide
import polars as pl

from cytosyn_data.cli import main
from cytosyn_data.io.png import decode_png
from cytosyn_data.io.tar_read import iter_tar_members


def test_export_then_import_tiles_the_same_tiles(tmp_path, cmu_slide):
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "a"), "--tiles", "12"]) == 0
    assert main(["export-h5", "--run", str(tmp_path / "a")]) == 0
    tiles = pl.read_parquet(tmp_path / "a" / "tiles.parquet")
    with h5py.File(tmp_path / "a" / "h5" / "cmu-1-small-region.h5") as f:
        coords, attrs = f["coords"][()], dict(f["coords"].attrs)
        keys = [k.decode() for k in f["keys"][()]]
    assert coords.dtype == np.int64 and list(map(tuple, coords.tolist())) == tiles.select("x", "y").rows()
    assert keys == tiles["key"].to_list()
    assert (attrs["patch_size"], attrs["patch_level"], attrs["name"]) == (224, 0, "cmu-1-small-region")
    assert attrs["patch_size_level0"] == 224.0 and abs(attrs["level0_magnification"] - 20.04) < 0.01
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "b"), "--tiles", "all",
                 "--coords", str(tmp_path / "a" / "h5")]) == 0
    b = pl.read_parquet(tmp_path / "b" / "tiles.parquet")
    assert sorted(b["key"]) == sorted(tiles["key"]) and dict(zip(b["key"], b["sha256"])) == dict(zip(tiles["key"], tiles["sha256"]))


def test_off_grid_coordinates_read_exactly_there(tmp_path, cmu_slide):
    folder = tmp_path / "coords"
    folder.mkdir()
    xy = np.array([[13, 7], [1001, 1500], [500, 2700]], np.int64)
    with h5py.File(folder / "cmu-1-small-region.h5", "w") as f:
        f.create_dataset("coords", data=xy).attrs["patch_size_level0"] = 224
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "o"), "--tiles", "all",
                 "--coords", str(folder / "cmu-1-small-region.h5")]) == 0  # one file for one slide
    tiles = pl.read_parquet(tmp_path / "o" / "tiles.parquet")
    members = {n: d for p in (tmp_path / "o" / "shards").glob("*.tar") for n, d in iter_tar_members(p)}
    ref = openslide.OpenSlide(str(cmu_slide))
    assert sorted(tiles.select("x", "y").rows()) == sorted(map(tuple, xy.tolist()))
    for row in tiles.iter_rows(named=True):  # glass included: given coordinates skip the tissue rule
        want = np.asarray(ref.read_region((row["x"], row["y"]), 0, (224, 224)).convert("RGB"))
        assert np.array_equal(decode_png(members[f"{row['key']}.png"]), want)


def test_bad_coordinate_files_name_the_cause(tmp_path, cmu_slide, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    with h5py.File(folder / "cmu-1-small-region.h5", "w") as f:
        f.create_dataset("coords", data=np.array([[0, 0]], np.int64)).attrs["patch_size_level0"] = 512
    base = ["tile", "--slides", str(cmu_slide), "--coords", str(folder)]
    assert main(base + ["--out", str(tmp_path / "o"), "--tiles", "all"]) == 1
    assert "patch_size_level0 512 differs from this run's tile side 224" in pl.read_parquet(tmp_path / "o" / "slides.parquet")["error"][0]
    assert main(base + ["--out", str(tmp_path / "p"), "--tiles", "5"]) == 2
    assert "--coords tiles exactly the given coordinates: give --tiles all" in capsys.readouterr().err
    assert main(["tile", "--slides", str(cmu_slide), str(cmu_slide.parent / "tcga-cr-7395-01a-01-ts1.svs"), "--out",
                 str(tmp_path / "r"), "--tiles", "all", "--coords", str(folder / "cmu-1-small-region.h5")]) == 2
    assert "is one file: give one slide" in capsys.readouterr().err
    with h5py.File(folder / "cmu-1-small-region.h5", "w") as f:
        f.create_dataset("coords", data=np.array([[2200, 0]], np.int64))
    assert main(base + ["--out", str(tmp_path / "q"), "--tiles", "all"]) == 1
    assert "tile at (2200, 0) leaves the slide (2220 x 2967" in pl.read_parquet(tmp_path / "q" / "slides.parquet")["error"][0]
