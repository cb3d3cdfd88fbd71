"""Coordinates for and from TRIDENT and CLAM, proven with their own reading and writing lines.

Replayed (not imported: neither tool installs on CI), each cited where used:
- TRIDENT mahmoodlab/TRIDENT@a91fa84: ``trident/IO.py`` (``coords_to_h5``, ``read_coords``),
  ``trident/wsi_objects/WSIPatcher.py`` (``__init__``, ``_prepare``, ``get_tile_xy``),
  ``trident/wsi_objects/WSI.py`` (``extract_features``, ``_fetch_magnification``),
  ``trident/Visualization.py`` (``visualize_heatmap``: ``read_region((x, y), 0, (patch_size_level0,) * 2)``).
- CLAM mahmoodlab/CLAM@53e2409: ``dataset_modules/dataset_h5.py`` (``Whole_Slide_Bag_FP``),
  ``wsi_core/WholeSlideImage.py`` (``process_contour``'s attributes), ``create_patches_fp.py``
  (``save_dir/patches/{slide_id}.h5``), ``extract_features_fp.py`` (``data_h5_dir/patches/{slide_id}.h5``).
"""

from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import openslide
import polars as pl
import pytest

from cytosyn_data.cli import main
from cytosyn_data.io.png import decode_png
from cytosyn_data.io.tar_read import iter_tar_members

NAME = "cmu-1-small-region"


def _tiles(run):
    tiles = pl.read_parquet(run / "tiles.parquet")
    members = {n: d for p in (run / "shards").glob("*.tar") for n, d in iter_tar_members(p)}
    return tiles, {k: decode_png(members[f"{k}.png"]) for k in tiles["key"]}


def _trident_patches(h5_path, slide):
    """TRIDENT a91fa84 reading a coords file for feature extraction: IO.read_coords, then
    WSI.extract_features -> create_patcher(patch_size, src_mag=level0_magnification,
    dst_mag=target_magnification, custom_coords=coords) -> WSIPatcher.__init__/_prepare/get_tile_xy."""
    with h5py.File(h5_path, "r") as f:
        attrs, coords = dict(f["coords"].attrs), f["coords"][:]
    patch_size = attrs["patch_size"]
    src_pixel_size, dst_pixel_size = 10 / attrs["level0_magnification"], 10 / attrs["target_magnification"]
    downsample = dst_pixel_size / src_pixel_size
    patch_size_src = round(patch_size * downsample)
    level = slide.get_best_level_for_downsample(downsample)  # get_best_level_and_custom_downsample, one-level slide
    patch_size_level = round(patch_size_src / int(slide.level_downsamples[level]))
    out = []
    for x, y in coords:
        tile = np.asarray(slide.read_region((x, y), level, (patch_size_level, patch_size_level)).convert("RGB"))
        out.append(cv2.resize(tile, (patch_size, patch_size))[:, :, :3])
    return attrs, coords, patch_size_src, out


def _clam_patches(h5_path, slide):
    """CLAM 53e2409 dataset_h5.Whole_Slide_Bag_FP: attrs patch_level, patch_size, then
    ``wsi.read_region(coord, self.patch_level, (self.patch_size, self.patch_size)).convert('RGB')``."""
    with h5py.File(h5_path, "r") as f:
        patch_level, patch_size = f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"]
        coords = f["coords"][:]
    return patch_level, patch_size, coords, [np.asarray(slide.read_region(tuple(c), patch_level, (patch_size, patch_size))
                                                        .convert("RGB")) for c in coords]


@pytest.mark.parametrize("mpp", [None, 0.2527])  # native 0.499 MPP; as a 40x slide, each tile 443 px shrunk to 224
def test_trident_and_clam_read_our_tiles_from_their_own_layouts(tmp_path, cmu_slide, mpp):
    run = tmp_path / "run"
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(run), "--tiles", "10"]
                + (["--mpp", str(mpp)] if mpp else [])) == 0
    assert main(["export-h5", "--run", str(run)]) == 0
    assert main(["export-h5", "--run", str(run), "--format", "clam"]) == 0
    tiles, ours = _tiles(run)
    slide = openslide.OpenSlide(str(cmu_slide))
    side = int(round(tiles["footprint"][0]))  # our read area, level-0 px: 224, or 443 at 0.2527 MPP

    attrs, coords, patch_size_src, patches = _trident_patches(run / "h5" / "trident" / "patches" / f"{NAME}_patches.h5", slide)
    assert list(map(tuple, coords.tolist())) == tiles.select("x", "y").rows() and patch_size_src == side
    assert attrs["level0_magnification"] == (40 if mpp else 20) and attrs["patch_size"] == 224
    for k in ("patch_size", "patch_size_level0", "level0_magnification", "overlap", "level0_width", "level0_height"):
        assert isinstance(attrs[k], np.integer), k  # ints where TRIDENT writes ints
    assert attrs["patch_size_level0"] == side
    x, y = coords[0]  # Visualization.visualize_heatmap's read, which a float size breaks
    assert slide.read_region((x, y), 0, (attrs["patch_size_level0"], attrs["patch_size_level0"])).size == (side, side)

    level, size, ccoords, cpatches = _clam_patches(run / "h5" / "clam" / "patches" / f"{NAME}.h5", slide)
    assert ccoords.tolist() == coords.tolist() and level == 0 and size == side
    for key, t, c in zip(tiles["key"], patches, cpatches):
        if mpp is None:  # read natively: the same pixels, to the bit
            assert np.array_equal(t, ours[key]) and np.array_equal(c, ours[key])
        else:  # the same area, resampled by each tool's own filter (ours: area; TRIDENT: bilinear)
            assert np.abs(t.astype(int) - ours[key]).mean() < 4
            small = cv2.resize(c, (224, 224), interpolation=cv2.INTER_AREA)  # CLAM's transforms resize to the model's
            assert np.abs(small.astype(int) - ours[key]).mean() < 1


def _trident_file(path, coords, patch_size=224, src_mag=20, target_mag=20, width=2220, height=2967):
    """What TRIDENT a91fa84 IO.coords_to_h5 writes (its attribute lines, through save_h5)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=np.asarray(coords, np.int64), maxshape=(None, 2), chunks=(1, 2))
        ds.attrs.update({"patch_size": patch_size, "patch_size_level0": patch_size * src_mag // target_mag,
                         "level0_magnification": src_mag, "target_magnification": target_mag, "overlap": 0,
                         "name": NAME, "savetodir": str(path.parent.parent), "level0_width": width,
                         "level0_height": height})


def test_a_trident_grid_with_edge_patches_is_tiled_whole(tmp_path, cmu_slide):
    """TRIDENT's grid keeps patches that overhang the slide's edge; they are tiled, glass white beyond it."""
    xs, ys = np.arange(0, 2220, 224), np.arange(0, 2967, 224)  # WSIPatcher's grid: 10 x 14, the last ones overhang
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)[::7]
    job = tmp_path / "trident_job" / "20x_224px_0px_overlap"
    _trident_file(job / "patches" / f"{NAME}_patches.h5", grid)
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "o"), "--tiles", "all",
                 "--coords", str(job)]) == 0
    tiles, ours = _tiles(tmp_path / "o")
    assert sorted(tiles.select("x", "y").rows()) == sorted(map(tuple, grid.tolist()))
    slide = openslide.OpenSlide(str(cmu_slide))
    n_over = 0
    for row in tiles.iter_rows(named=True):
        rgba = np.asarray(slide.read_region((row["x"], row["y"]), 0, (224, 224)))
        inside = rgba[..., 3] == 255
        got = ours[row["key"]]
        assert np.array_equal(got[inside], rgba[inside][:, :3]) and (got[~inside] == 255).all()
        n_over += int((~inside).any())
    facts = json.loads((tmp_path / "o" / "work" / "detect" / f"{NAME}.json").read_text())
    assert n_over > 0 and facts["coords_overhang"] == n_over


def test_clam_layout_and_its_patch_size_are_honoured_or_refused(tmp_path, cmu_slide):
    save_dir = tmp_path / "clam"  # create_patches_fp.py: save_dir/patches/{slide_id}.h5
    (save_dir / "patches").mkdir(parents=True)
    xy = np.array([[0, 0], [448, 896]], np.int64)

    def clam_file(patch_size):  # WholeSlideImage.process_contour's attribute lines
        with h5py.File(save_dir / "patches" / f"{NAME}.h5", "w") as f:
            f.create_dataset("coords", data=xy).attrs.update(
                {"patch_size": patch_size, "patch_level": 0, "downsample": (1.0, 1.0),
                 "downsampled_level_dim": (2220, 2967), "level_dim": (2220, 2967), "name": NAME, "save_path": str(save_dir)})

    clam_file(224)
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "a"), "--tiles", "all",
                 "--coords", str(save_dir)]) == 0
    assert sorted(pl.read_parquet(tmp_path / "a" / "tiles.parquet").select("x", "y").rows()) == [(0, 0), (448, 896)]
    clam_file(256)
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "b"), "--tiles", "all",
                 "--coords", str(save_dir)]) == 1
    err = pl.read_parquet(tmp_path / "b" / "slides.parquet")["error"][0]
    assert f"{NAME}.h5: its patches are 256 level-0 px (clam attributes) but this run's tiles are 224 level-0 px" in err


def test_export_then_import_tiles_the_same_tiles(tmp_path, cmu_slide):
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "a"), "--tiles", "12"]) == 0
    assert main(["export-h5", "--run", str(tmp_path / "a"), "--out", str(tmp_path / "x")]) == 0
    tiles = pl.read_parquet(tmp_path / "a" / "tiles.parquet")
    with h5py.File(tmp_path / "x" / "patches" / f"{NAME}_patches.h5") as f:
        coords, keys = f["coords"][()], [k.decode() for k in f["keys"][()]]
    assert coords.dtype == np.int64 and list(map(tuple, coords.tolist())) == tiles.select("x", "y").rows()
    assert keys == tiles["key"].to_list()
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "b"), "--tiles", "all",
                 "--coords", str(tmp_path / "x")]) == 0
    b = pl.read_parquet(tmp_path / "b" / "tiles.parquet")
    assert sorted(b["key"]) == sorted(tiles["key"]) and dict(zip(b["key"], b["sha256"])) == dict(zip(tiles["key"], tiles["sha256"]))


def test_off_grid_coordinates_read_exactly_there(tmp_path, cmu_slide):
    folder = tmp_path / "coords"
    folder.mkdir()
    xy = np.array([[13, 7], [1001, 1500], [500, 2700]], np.int64)
    with h5py.File(folder / f"{NAME}.h5", "w") as f:
        f.create_dataset("coords", data=xy).attrs["patch_size_level0"] = 224
    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path / "o"), "--tiles", "all",
                 "--coords", str(folder / f"{NAME}.h5")]) == 0  # one file for one slide
    tiles, ours = _tiles(tmp_path / "o")
    ref = openslide.OpenSlide(str(cmu_slide))
    assert sorted(tiles.select("x", "y").rows()) == sorted(map(tuple, xy.tolist()))
    for row in tiles.iter_rows(named=True):  # glass included: given coordinates skip the tissue rule
        want = np.asarray(ref.read_region((row["x"], row["y"]), 0, (224, 224)).convert("RGB"))
        assert np.array_equal(ours[row["key"]], want)


def test_bad_coordinate_files_name_the_cause(tmp_path, cmu_slide, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    with h5py.File(folder / f"{NAME}.h5", "w") as f:
        f.create_dataset("coords", data=np.array([[0, 0]], np.int64)).attrs["patch_size_level0"] = 512
    base = ["tile", "--slides", str(cmu_slide), "--coords", str(folder)]
    assert main(base + ["--out", str(tmp_path / "o"), "--tiles", "all"]) == 1
    assert "its patches are 512 level-0 px (trident attributes) but this run's tiles are 224" in \
        pl.read_parquet(tmp_path / "o" / "slides.parquet")["error"][0]
    assert main(base + ["--out", str(tmp_path / "p"), "--tiles", "5"]) == 2
    assert "--coords tiles exactly the given coordinates: give --tiles all" in capsys.readouterr().err
    assert main(["tile", "--slides", str(cmu_slide), str(cmu_slide.parent / "tcga-cr-7395-01a-01-ts1.svs"), "--out",
                 str(tmp_path / "r"), "--tiles", "all", "--coords", str(folder / f"{NAME}.h5")]) == 2
    assert "is one file: give one slide" in capsys.readouterr().err
    with h5py.File(folder / f"{NAME}.h5", "w") as f:
        f.create_dataset("coords", data=np.array([[2230, 0]], np.int64))
    assert main(base + ["--out", str(tmp_path / "q"), "--tiles", "all"]) == 1
    assert "patch at (2230, 0) starts outside the slide (2220 x 2967 level-0 px); 1 such" in \
        pl.read_parquet(tmp_path / "q" / "slides.parquet")["error"][0]
    (folder / f"{NAME}.h5").unlink()
    assert main(base + ["--out", str(tmp_path / "s"), "--tiles", "all"]) == 1
    assert "no coordinates file for this slide (--coords looks for {name}.h5, patches/{name}.h5" in \
        pl.read_parquet(tmp_path / "s" / "slides.parquet")["error"][0]


def test_export_in_slide_batches_equals_one_batch(tmp_path, cmu_slide, tcga_slide):
    """export-h5 reads tiles.parquet for batches of slides (memory: one batch, not the run)."""
    from conftest import tile_two_slides
    from cytosyn_data.reports.coords_export import export_h5

    run = tile_two_slides(tmp_path, cmu_slide, tcga_slide, "30")
    one = export_h5(run, out=tmp_path / "one")
    many = export_h5(run, out=tmp_path / "many", max_tiles=1)  # a batch per slide
    assert [p.name for p in one] == [p.name for p in many] and len(one) == 2
    for a, b in zip(one, many):
        with h5py.File(a) as fa, h5py.File(b) as fb:
            assert np.array_equal(fa["coords"][()], fb["coords"][()]) and len(fa["coords"]) > 0
