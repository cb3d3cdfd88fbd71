"""Tissue detection on the real H&E images with pen marks in ../shared/data/images."""

import numpy as np
import pytest
from PIL import Image

from cytosyn_data.wsi.tissue import TissueParams, pen_mask, tile_tissue_fractions, tissue_mask
from cytosyn_data.wsi.tissue import _drop_small


def load(images_dir, name):
    return np.asarray(Image.open(images_dir / name).convert("RGB"))


@pytest.mark.parametrize(
    "name",
    [
        "tcga-red-pen.png",
        "tcga-green-pen.png",
        "wsi-blue-pen.png",
        "high-nuclei-score-red-pen-level1.png",
        "medium-nuclei-score-green-pen-level1.png",
        "no-tissue-red-pen.png",
        "no-tissue-green-pen.png",
    ],
)
def test_pen_marks_are_excluded(images_dir, name):
    rgb = load(images_dir, name)
    ink = _drop_small(pen_mask(rgb), TissueParams().min_pen_um2 / 64)
    assert ink.sum() > 0.005 * ink.size, "the image holds a pen mark"
    mask = tissue_mask(rgb, mpp=8.0)
    assert not (mask & ink).any()


@pytest.mark.parametrize("name", ["no-tissue.png", "no-tissue2.png", "almost-white-1.png", "no-tissue-line.png", "no-tissue-green-pen.png"])
def test_empty_glass_lines_and_ink_are_not_tissue(images_dir, name):
    assert tissue_mask(load(images_dir, name), mpp=8.0).mean() < 0.01


def test_red_ink_without_tissue_is_mostly_removed(images_dir):
    rgb = load(images_dir, "no-tissue-red-pen.png")
    saturated = (np.asarray(Image.fromarray(rgb).convert("HSV"))[..., 1] > 25).mean()
    assert saturated > 0.6
    assert tissue_mask(rgb, mpp=8.0).mean() < 0.2  # only the faint halo of the stroke remains


@pytest.mark.parametrize(
    "name,low",
    [("tcga-lung-rgb.png", 0.6), ("tissue-level0-7352-11762-7864-12274.png", 0.7), ("tcga-red-pen.png", 0.4)],
)
def test_tissue_is_found(images_dir, name, low):
    assert tissue_mask(load(images_dir, name), mpp=8.0).mean() > low


def test_tile_fractions_from_integral_image():
    mask = np.zeros((100, 200), bool)
    mask[:50, :100] = True  # level 0 is 2000 x 1000 -> 10 level-0 px per mask px
    x = np.array([0, 500, 1000, 250])
    y = np.array([0, 0, 0, 250])
    f = tile_tissue_fractions(mask, x, y, 500.0, (2000, 1000))
    np.testing.assert_allclose(f, [1.0, 1.0, 0.0, 0.5])
    f = tile_tissue_fractions(mask, np.array([750]), np.array([250]), 500.0, (2000, 1000))
    np.testing.assert_allclose(f, [0.25])


def test_enclosed_background_equals_scipy_binary_fill_holes():
    from scipy import ndimage

    from cytosyn_data.wsi.tissue import enclosed_background

    rng = np.random.default_rng(0)
    for i in range(300):
        m = rng.random((int(rng.integers(1, 60)), int(rng.integers(1, 60)))) < rng.random()
        assert np.array_equal(enclosed_background(m), ndimage.binary_fill_holes(m) & ~m), i


def _pen_rules_numpy(rgb):
    """The ink rules of pen_mask's docstring, in degrees, written out in numpy."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    sat, val = hsv[..., 1], hsv[..., 2]
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    red = ((hue <= 15) | (hue >= 345)) & (sat >= 140)
    dark_red = (hue >= 315) & (hue < 345) & (sat >= 120) & (val < 110)
    green = (sat >= 40) & (hue >= 70) & (hue < 200) & (g > r + 20)
    blue = (sat >= 60) & (hue >= 195) & (hue < 250) & (b - r > 45) & (b > g)
    return red | dark_red | green | blue


def test_pen_mask_equals_its_rules_on_every_rgb_colour():
    import cv2

    cube = np.stack(np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing="ij"), -1).reshape(4096, 4096, 3)
    want = _pen_rules_numpy(cube)
    assert 0 < want.sum() < want.size
    assert np.array_equal(pen_mask(cube), want)
    assert np.array_equal(pen_mask(cube, hsv=cv2.cvtColor(cube, cv2.COLOR_RGB2HSV_FULL)), want)


def test_a_tissue_mask_over_most_of_the_slide_is_flagged(tmp_path, cmu_slide):
    """Glass that reads as colour (a mis-encoded slide) gives 'tissue' everywhere: slides.parquet
    and report.md carry a warning; a normal slide has none."""
    import polars as pl
    import tifffile

    from cytosyn_data.cli import main

    rng = np.random.default_rng(0)
    img = np.stack([rng.integers(150, 230, (1024, 1024)), rng.integers(40, 140, (1024, 1024)),
                    rng.integers(120, 210, (1024, 1024))], -1).astype(np.uint8)  # pink from edge to edge
    tifffile.imwrite(tmp_path / "pink.tif", img, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    assert main(["tile", "--slides", str(tmp_path / "pink.tif"), str(cmu_slide), "--out", str(tmp_path / "o"),
                 "--tiles", "4"]) == 0
    slides = pl.read_parquet(tmp_path / "o" / "slides.parquet").sort("slide_id")
    warn = dict(zip(slides["slide_id"], slides["qc_warning"]))
    assert warn["cmu-1-small-region"] is None and 0.2 < slides["tissue_area_fraction"][0] < 0.6
    assert warn["pink"].startswith("tissue mask covers 100% of the slide (> 90%): glass read as tissue?")
    assert "## Tissue-mask warnings" in (report := (tmp_path / "o" / "report.md").read_text()) and "| pink |" in report
