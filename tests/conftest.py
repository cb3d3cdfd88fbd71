"""Shared fixtures: the real data in ../shared/data (tests skip only when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CYTOSYN_SHARED", ROOT.parent / "shared")) / "data"


def _need(path: Path) -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared test data not found at {SHARED}")
    assert path.exists(), f"{path} is missing from the shared data"
    return path


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    return _need(SHARED / "wsi" / "cmu-1-small-region.svs")


@pytest.fixture(scope="session")
def tcga_slide() -> Path:
    return _need(SHARED / "wsi" / "tcga-cr-7395-01a-01-ts1.svs")


@pytest.fixture(scope="session")
def broken_slide() -> Path:
    return _need(SHARED / "wsi" / "broken.svs")


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return _need(SHARED / "images")


def tile_two_slides(out: Path, cmu: Path, tcga: Path, tiles: str, shard_size: int = 16, project: str | None = None) -> Path:
    """Tile the two real shared slides (the TCGA one at --mpp-override 0.25) into ``out``; returns ``out``."""
    from cytosyn_data.cli import main

    table = out / "slides.csv"
    if project is None:
        table.write_text(f"path,mpp\n{cmu},\n{tcga},0.25\n")
    else:
        table.write_text(f"path,mpp,project\n{cmu},,{project}\n{tcga},0.25,{project}\n")
    assert main(["tile", "--slides", str(table), "--out", str(out), "--tiles", tiles, "--shard-size", str(shard_size)]) == 0
    return out


def write_pyramid_tiff(path: Path, mpp: float, size: int = 2048, levels: int = 1, seed: int = 0) -> np.ndarray:
    """A tiled RGB TIFF at ``mpp`` with a pink 'tissue' disc on white; returns level 0 [h, w, 3]."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (0.42 * size) ** 2
    img = np.full((size, size, 3), 245, np.uint8)
    tissue = np.stack(
        [rng.integers(150, 230, (size, size)), rng.integers(40, 140, (size, size)), rng.integers(120, 210, (size, size))],
        -1,
    ).astype(np.uint8)
    img[disc] = tissue[disc]
    res = 1e4 / mpp  # pixels per centimeter
    with tifffile.TiffWriter(path) as tif:
        opts = dict(tile=(256, 256), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
        tif.write(img, resolution=(res, res), **opts)
        level = img
        for i in range(1, levels):
            level = level.reshape(level.shape[0] // 2, 2, level.shape[1] // 2, 2, 3).mean((1, 3)).round().astype(np.uint8)
            tif.write(level, subfiletype=1, resolution=(res / 2**i, res / 2**i), **opts)
    return img
