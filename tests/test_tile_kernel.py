"""The tile kernel's pieces: fast tar headers and per-tile QC measures."""

from __future__ import annotations

import tarfile
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest

from cytosyn_data.io.png import decode_png
from cytosyn_data.io.tar_write import _tarinfo, member_header
from cytosyn_data.run.schemas import QC_SCHEMA
from cytosyn_data.tile.render import tile_qc
from cytosyn_data.wsi.tissue import pen_mask

IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "images"


@pytest.mark.parametrize("name, size", [("a__x1_y2.png", 12345), ("TCGA-CR-7395-01A-01-TS1__x123456_y98765.json", 0),
                                        ("k" * 99, 8**11 - 1), ("k" * 100, 5), ("é.png", 3), ("big.png", 8**11)])
def test_member_header_equals_tarfile_pax_output(name, size):
    assert member_header(name, size) == _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _tile(name: str) -> np.ndarray:
    img = decode_png((IMAGES / name).read_bytes()) if (IMAGES / name).exists() else pytest.skip("../shared absent")
    return cv2.resize(img[:512, :512], (224, 224), interpolation=cv2.INTER_AREA)


def test_qc_measures_rank_real_tiles():
    tissue = dict(zip(QC_SCHEMA, tile_qc(_tile("tissue-level0-4302-10273-4814-10785.png"))))
    blurred = dict(zip(QC_SCHEMA, tile_qc(cv2.GaussianBlur(_tile("tissue-level0-4302-10273-4814-10785.png"), (0, 0), 3))))
    glass = dict(zip(QC_SCHEMA, tile_qc(_tile("no-tissue.png"))))
    pen = dict(zip(QC_SCHEMA, tile_qc(_tile("no-tissue-red-pen.png"))))
    assert tissue["qc_tissue"] > 0.5 > glass["qc_tissue"]
    assert tissue["qc_blur"] > 5 * blurred["qc_blur"]
    assert tissue["qc_saturation"] > glass["qc_saturation"] and glass["qc_brightness"] > 200
    assert pen["qc_pen"] > 0.05 and tissue["qc_pen"] < 0.01
    # the measures are what their docstring says, on a known image
    flat = np.full((224, 224, 3), (200, 100, 150), np.uint8)
    q = dict(zip(QC_SCHEMA, tile_qc(flat)))
    hsv = cv2.cvtColor(flat[:1, :1], cv2.COLOR_RGB2HSV_FULL)[0, 0]
    assert q == pytest.approx({"qc_tissue": 1.0, "qc_blur": 0.0, "qc_saturation": float(hsv[1]),
                               "qc_brightness": float(hsv[2]), "qc_pen": 0.0})


def test_tiles_parquet_carries_the_qc_of_each_png(tmp_path, cmu_slide):
    from cytosyn_data.cli import main
    from cytosyn_data.io.tar_read import iter_tar_members

    assert main(["tile", "--slides", str(cmu_slide), "--out", str(tmp_path), "--tiles", "8"]) == 0
    tiles = pl.read_parquet(tmp_path / "tiles.parquet")
    members = {n: b for p in (tmp_path / "shards").glob("*.tar") for n, b in iter_tar_members(p)}
    for row in tiles.iter_rows(named=True):
        want = tile_qc(decode_png(members[f"{row['key']}.png"]))
        assert [row[c] for c in QC_SCHEMA] == pytest.approx([round(v, 4) for v in want], rel=1e-6, abs=1e-4)


@pytest.mark.parametrize("side", [224, 222, 37])
def test_batched_qc_equals_each_tile_alone_and_opencv_per_tile(side):
    from cytosyn_data.tile.render import tiles_qc

    rng = np.random.default_rng(side)
    smooth = np.stack([cv2.GaussianBlur(t, (0, 0), 2) for t in rng.integers(0, 256, (7, side, side, 3), dtype=np.uint8)])
    tiles = np.concatenate([smooth, rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)])
    tiles[3, :, :side // 2] = (220, 30, 40)  # red ink over half a tile
    batch = tiles_qc(tiles)
    for t, got in zip(tiles, batch):
        assert tuple(got) == tile_qc(t)  # a tile's measures do not depend on its batch
        # the definitions, one OpenCV call at a time on this tile alone
        half = cv2.resize(t, (side // 2, side // 2), interpolation=cv2.INTER_AREA)
        lap = cv2.Laplacian(cv2.cvtColor(half, cv2.COLOR_RGB2GRAY), cv2.CV_16S, ksize=1)
        small = cv2.resize(half, (side // 4, side // 4), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV_FULL)
        want = [((hsv[..., 1] > 20) & (hsv[..., 2] >= 30)).mean(), lap.astype(np.float64).var(),
                hsv[..., 1].mean(), hsv[..., 2].mean(), pen_mask(small).mean()]
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert batch[3, 4] > batch[0, 4] + 0.3


def test_the_reader_factory_gives_the_same_pixels_through_either_reader(cmu_slide):
    from cytosyn_data.wsi.slide import load_wsi

    with load_wsi(cmu_slide) as s:  # openslide, with the fast TIFF path inside (the file allows it)
        dims, ds = s.level_dimensions, s.level_downsamples
        ref = s.read_rgb((1000, 700), 0, (300, 200))
        assert s.backend == "openslide" and s.fast_reads
    with load_wsi(cmu_slide, "tiff", level_dimensions=dims, level_downsamples=ds, band=(0, 300)) as t:
        assert np.array_equal(t.read_rgb((1000, 700), 0, (300, 200)), ref)  # openslide never opened
        assert t.decoded > 0
    with pytest.raises(ValueError, match="unknown reader 'x'"):
        load_wsi(cmu_slide, "x")
