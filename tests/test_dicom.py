"""DICOM WSI: a folder holding one series is one slide, read with openslide's DICOM support.

The series is CMU-1 (small region) converted by wsidicomizer (PyPI) with uncompressed frames, so its
pixels are the SVS's decoded pixels: every tile must equal the SVS read by openslide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import polars as pl
import pytest

from cytosyn_data.cli import main
from cytosyn_data.io.png import decode_png
from cytosyn_data.io.tar_read import iter_tar_members
from cytosyn_data.run.slide_table import build_slide_table

wsidicomizer = pytest.importorskip("wsidicomizer")


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory, cmu_slide) -> Path:
    from wsidicom.codec import NumpySettings
    from wsidicomizer.sources import TiffSlideSource

    folder = tmp_path_factory.mktemp("dicom") / "cohort" / "1.2.826.0.1.3680043.8.498.4242"
    folder.mkdir(parents=True)
    wsidicomizer.WsiDicomizer.convert(str(cmu_slide), str(folder), preferred_source=TiffSlideSource,
                                      encoding=NumpySettings())
    assert len(list(folder.glob("*.dcm"))) >= 2  # the level and the thumbnail/overview instances
    return folder


def test_a_folder_of_one_series_is_one_slide(dicom_series, cmu_slide, tmp_path):
    (tmp_path / "other.svs").symlink_to(cmu_slide)
    table = build_slide_table([dicom_series.parent, tmp_path])
    assert table["slide_id"].to_list() == ["1-2-826-0-1-3680043-8-498-4242", "other"]
    assert table["path"][0] == str(dicom_series)


def test_dicom_series_tiles_equal_the_svs_it_came_from(dicom_series, cmu_slide, tmp_path):
    def run(path: Path, out: Path):
        table = tmp_path / f"{out.name}.csv"
        pl.DataFrame({"path": [str(path)], "slide_id": ["cmu"]}).write_csv(table)
        assert main(["tile", "--slides", str(table), "--out", str(out), "--tiles", "all", "--shard-size", "20"]) == 0
        return out

    svs, dcm = run(cmu_slide, tmp_path / "svs"), run(dicom_series, tmp_path / "dcm")
    s = pl.read_parquet(dcm / "slides.parquet").row(0, named=True)
    assert (s["vendor"], s["mpp_source"], s["mpp"], s["width"], s["height"]) == ("dicom", "openslide", 0.499, 2220, 2967)
    # every DICOM tile is the SVS's pixels at the same place (the PNG bytes are equal)
    ref = openslide.OpenSlide(str(cmu_slide))
    a, b = _members(svs), _members(dcm)
    tiles = pl.read_parquet(dcm / "tiles.parquet")
    for row in tiles.iter_rows(named=True):
        png = b[f"{row['key']}.png"]
        want = np.asarray(ref.read_region((row["x"], row["y"]), 0, (224, 224)).convert("RGB"))
        assert np.array_equal(decode_png(png), want), row["key"]
        if f"{row['key']}.png" in a:
            assert a[f"{row['key']}.png"] == png
    # detection's thumbnail follows one rule whatever the reader: the same candidates, the same tiles
    keys = set(pl.read_parquet(svs / "tiles.parquet")["key"])
    assert keys == set(tiles["key"]) and len(keys) > 40


def test_one_thumbnail_whatever_the_reader(dicom_series, cmu_slide, tcga_slide):
    """openslide, tiffslide, the fast TIFF reader (openslide's handle), and the DICOM series of the
    same slide give detection the same thumbnail pixels, so the same mask and tiles."""
    from cytosyn_data.wsi.slide import load_wsi

    for path, size in ((cmu_slide, (139, 185)), (cmu_slide, (555, 741)), (tcga_slide, (277, 222)), (tcga_slide, (1100, 890))):
        thumbs = {}
        for reader in ("auto", "openslide", "tiffslide"):
            with load_wsi(path, reader) as s:
                thumbs[reader] = s.thumbnail(size)
                assert s.fast_reads == (reader == "auto")
        if path == cmu_slide:
            with load_wsi(dicom_series) as s:
                thumbs["dicom"] = s.thumbnail(size)
        ref = thumbs.pop("auto")
        assert ref.shape == (size[1], size[0], 3)
        for reader, t in thumbs.items():
            assert np.array_equal(t, ref), (path.name, size, reader, int(np.abs(t.astype(int) - ref).max()))


def _members(run: Path) -> dict[str, bytes]:
    return {n: d for p in sorted((run / "shards").glob("*.tar")) for n, d in iter_tar_members(p)}


def test_a_folder_without_a_series_names_the_cause(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    table = tmp_path / "t.csv"
    pl.DataFrame({"path": [str(tmp_path / "empty")], "slide_id": ["e"]}).write_csv(table)
    assert main(["tile", "--slides", str(table), "--out", str(tmp_path / "o"), "--tiles", "5"]) == 1
    err = pl.read_parquet(tmp_path / "o" / "slides.parquet")["error"][0]
    assert "a folder is a slide only when it holds a DICOM WSI series" in err
