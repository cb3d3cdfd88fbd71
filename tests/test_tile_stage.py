"""End-to-end tests of `cytosyn-data tile` on the real slides in ../shared/data/wsi."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import polars as pl
import pytest

from cytosyn_data.core.errors import RunStateError
import webdataset as wds

from conftest import write_pyramid_tiff
from cytosyn_data.cli import main
from cytosyn_data.io.png import decode_png
from cytosyn_data.io.tar_read import iter_tar_members
from cytosyn_data.run.slide_table import build_slide_table
from cytosyn_data.tile.config import TileConfig
from cytosyn_data.tile.merge import merge_parts
from cytosyn_data.tile.stage import run_tile


def shard_members(out: Path) -> dict[str, bytes]:
    members = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        for name, data in iter_tar_members(tar):
            assert name not in members
            members[name] = data
    return members


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


@pytest.fixture(scope="module")
def cmu_run(tmp_path_factory, cmu_slide):
    out = tmp_path_factory.mktemp("cmu")
    rc = main(["tile", "--slides", str(cmu_slide), "--out", str(out), "--tiles", "all", "--shard-size", "16"])
    assert rc == 0
    return out


def test_cmu_tiles_are_pixel_identical_to_openslide(cmu_run, cmu_slide):
    tiles = pl.read_parquet(cmu_run / "tiles.parquet")
    assert tiles.height > 30
    assert tiles["read_level"].unique().to_list() == [0]  # 0.499 MPP is within 2% of 0.5: native
    members = shard_members(cmu_run)
    ref = openslide.OpenSlide(str(cmu_slide))
    for row in tiles.iter_rows(named=True):
        png = members[f"{row['key']}.png"]
        assert hashlib.sha256(png).hexdigest() == row["sha256"]
        got = decode_png(png)
        want = np.asarray(ref.read_region((row["x"], row["y"]), 0, (224, 224)).convert("RGB"))
        assert got.shape == (224, 224, 3)
        assert np.array_equal(got, want), row["key"]
        meta = json.loads(members[f"{row['key']}.json"])
        assert meta["key"] == row["key"] and meta["x"] == row["x"] and meta["shard"] == row["shard"]


def test_shards_read_back_with_webdataset_into_the_keys_of_tiles_parquet(cmu_run):
    tiles = pl.read_parquet(cmu_run / "tiles.parquet")
    urls = [str(p) for p in sorted((cmu_run / "shards").glob("*.tar"))]
    assert len(urls) == -(-tiles.height // 16)
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        assert sample["png"].shape == (224, 224, 3)
        keys.append(sample["__key__"])
    assert sorted(keys) == sorted(tiles["key"].to_list())
    assert len(keys) == len(set(keys))


def test_tables_qc_and_report(cmu_run):
    slides = pl.read_parquet(cmu_run / "slides.parquet")
    row = slides.row(0, named=True)
    assert row["status"] == "ok" and row["mpp"] == pytest.approx(0.499) and row["mpp_source"] == "openslide"
    assert row["vendor"] == "aperio" and row["levels"] == 1 and row["tss"] is None
    cand = pl.read_parquet(cmu_run / "candidates.parquet")
    assert cand.height == row["n_candidates"] == row["n_selected"]
    assert (cand["tissue_fraction"] >= 0.6).all()
    assert (cmu_run / "qc" / "cmu-1-small-region.png").stat().st_size > 1000
    report = (cmu_run / "report.md").read_text()
    assert "tiles/s" in report and "1 ok, 0 failed" in report


def test_missing_mpp_fails_then_override_tiles(tmp_path, tcga_slide, capsys):
    rc = main(["tile", "--slides", str(tcga_slide), "--out", str(tmp_path / "a"), "--tiles", "20"])
    assert rc == 1
    slides = pl.read_parquet(tmp_path / "a" / "slides.parquet")
    assert slides["status"].to_list() == ["failed"]
    assert "no microns-per-pixel" in slides["error"].item() and str(tcga_slide) in slides["error"].item()
    rc = main(["tile", "--slides", str(tcga_slide), "--out", str(tmp_path / "b"), "--tiles", "20", "--mpp-override", "0.25"])
    assert rc == 0
    s = pl.read_parquet(tmp_path / "b" / "slides.parquet").row(0, named=True)
    assert (s["mpp_source"], s["tss"], s["slide_type"], s["read_level"]) == ("override", "CR", "TS", 1)
    tiles = pl.read_parquet(tmp_path / "b" / "tiles.parquet")
    assert tiles.height == 20 and set(tiles["tss"]) == {"CR"}
    members = shard_members(tmp_path / "b")
    assert all(decode_png(members[f"{k}.png"]).shape == (224, 224, 3) for k in tiles["key"])


def test_broken_slide_is_reported_and_the_rest_finish(tmp_path, broken_slide, cmu_slide, capsys):
    rc = main(["tile", "--slides", str(broken_slide), str(cmu_slide), "--out", str(tmp_path), "--tiles", "10"])
    assert rc == 1
    slides = pl.read_parquet(tmp_path / "slides.parquet").sort("slide_id")
    assert slides["status"].to_list() == ["failed", "ok"]
    err = slides["error"][0]
    assert str(broken_slide) in err and "cannot open slide" in err
    assert pl.read_parquet(tmp_path / "tiles.parquet").height == 10
    assert "FAILED" in capsys.readouterr().out


def test_generated_tiff_at_quarter_micron_is_downsampled_2x(tmp_path):
    img = write_pyramid_tiff(tmp_path / "synthetic.tif", mpp=0.25)
    rc = main(["tile", "--slides", str(tmp_path / "synthetic.tif"), "--out", str(tmp_path / "o"), "--tiles", "all"])
    assert rc == 0
    tiles = pl.read_parquet(tmp_path / "o" / "tiles.parquet")
    assert tiles.height >= 9 and (tiles["read_level"] == 0).all()
    assert tiles["resample"][0].startswith("cv2.INTER_AREA")
    members = shard_members(tmp_path / "o")
    for row in tiles.iter_rows(named=True):
        x, y = row["x"], row["y"]
        region = img[y : y + 448, x : x + 448].astype(np.uint32)
        ref = ((region.reshape(224, 2, 224, 2, 3).sum((1, 3)) + 2) // 4).astype(np.uint8)
        assert np.array_equal(decode_png(members[f"{row['key']}.png"]), ref)


def test_native_pyramid_level_is_read_without_resampling(tmp_path):
    write_pyramid_tiff(tmp_path / "pyr.tif", mpp=0.25, levels=3)
    main(["tile", "--slides", str(tmp_path / "pyr.tif"), "--out", str(tmp_path / "o"), "--tiles", "5"])
    tiles = pl.read_parquet(tmp_path / "o" / "tiles.parquet")
    assert (tiles["read_level"] == 1).all() and (tiles["resample"] == "native").all()
    ref = openslide.OpenSlide(str(tmp_path / "pyr.tif"))
    members = shard_members(tmp_path / "o")
    for row in tiles.iter_rows(named=True):
        want = np.asarray(ref.read_region((row["x"], row["y"]), 1, (224, 224)).convert("RGB"))
        assert np.array_equal(decode_png(members[f"{row['key']}.png"]), want)


def _table(tmp_path: Path, cmu: Path, tcga: Path, n: int = 3) -> Path:
    rows = [{"path": str(cmu), "slide_id": f"cmu-{i}", "mpp": None} for i in range(n)]
    rows.append({"path": str(tcga), "slide_id": "TCGA-CR-7395-01A-01-TS1", "mpp": 0.25})
    path = tmp_path / "slides.csv"
    pl.DataFrame(rows, schema={"path": pl.String, "slide_id": pl.String, "mpp": pl.Float64}).write_csv(path)
    return path


def test_tss_stratified_budget_and_stable_picks(tmp_path, cmu_slide, tcga_slide):
    table = _table(tmp_path, cmu_slide, tcga_slide)
    slides = build_slide_table([table])
    res = run_tile(slides, tmp_path / "a", TileConfig(tiles=40, seed=7))
    # 3 slides without TSS, 1 from TSS CR: the budget follows the share of slides
    assert res.stratum_quotas == {"(none)": 30, "CR": 10}
    tiles = pl.read_parquet(tmp_path / "a" / "tiles.parquet")
    assert tiles.group_by("slide_id").len().sort("slide_id")["len"].to_list() == [10, 10, 10, 10]
    # a copy of the slides under other ids picks other tiles; the same id picks the same ones
    picks = {sid: set(g["key"].str.split("__").list.get(1)) for (sid,), g in tiles.group_by("slide_id")}
    assert picks["cmu-0"] != picks["cmu-1"]
    run_tile(build_slide_table([table]), tmp_path / "b", TileConfig(tiles=40, seed=7))
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_split_across_jobs_merges_without_collisions(tmp_path, cmu_slide, tcga_slide):
    slides = build_slide_table([_table(tmp_path, cmu_slide, tcga_slide)])
    cfg = TileConfig(tiles=40, seed=1, shard_size=8)
    single = run_tile(slides, tmp_path / "single", cfg)
    out = tmp_path / "split"
    for i in range(2):
        run_tile(slides, out, cfg, shard_index=i, num_shards=2, stage="detect")
    with pytest.raises(RuntimeError, match="parts of"):
        run_tile(slides, out, cfg, shard_index=0, num_shards=2)
        merge_parts(out)
    run_tile(slides, out, cfg, shard_index=1, num_shards=2)
    counts = merge_parts(out)
    assert counts["tiles"] == single.n_tiles == 40
    merged = pl.read_parquet(out / "tiles.parquet")
    assert sorted(merged["key"]) == sorted(pl.read_parquet(tmp_path / "single" / "tiles.parquet")["key"])
    names = [p.name for p in (out / "shards").glob("*.tar")]
    assert any("part0000of0002" in n for n in names) and any("part0001of0002" in n for n in names)
    assert sorted(shard_members(out)) == sorted(shard_members(tmp_path / "single"))


def test_rerun_with_other_settings_is_refused(tmp_path, cmu_slide):
    slides = build_slide_table([cmu_slide])
    run_tile(slides, tmp_path, TileConfig(tiles=5))
    with pytest.raises(RunStateError, match=r"other settings or inputs \(settings.config.tiles: 5 -> 6\): pass --overwrite"):
        run_tile(slides, tmp_path, TileConfig(tiles=6))
    (tmp_path / "geojson").mkdir()
    (tmp_path / "geojson" / "old.geojson").write_text("{}")  # an export of the old run
    (tmp_path / "report" / "img" / "old.jpg").write_bytes(b"x")
    res = run_tile(slides, tmp_path, TileConfig(tiles=6), overwrite=True)
    assert res.n_tiles == 6 and pl.read_parquet(tmp_path / "tiles.parquet").height == 6
    assert not (tmp_path / "geojson").exists() and not (tmp_path / "report" / "img" / "old.jpg").exists()


def _cli(out: Path, table: Path) -> list[str]:
    return [sys.executable, "-m", "cytosyn_data.cli", "tile", "--slides", str(table), "--out", str(out),
            "--tiles", "all", "--shard-size", "7", "--seed", "3"]


@pytest.mark.parametrize("kill_when", ["detect", "shards"])
def test_kill_and_resume_is_byte_identical(tmp_path, cmu_slide, tcga_slide, kill_when):
    table = _table(tmp_path, cmu_slide, tcga_slide, n=4)
    ref = tmp_path / "ref"
    subprocess.run(_cli(ref, table), check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out, table), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch = out / "work" / "detect" if kill_when == "detect" else out / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if watch.exists() and any(watch.iterdir()):
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "tiles.parquet").exists(), "the run was killed before it finished"
    subprocess.run(_cli(out, table), check=True, capture_output=True)
    assert shard_bytes(out) == shard_bytes(ref)
    assert len(shard_bytes(ref)) > 3
    a = pl.read_parquet(out / "tiles.parquet")
    b = pl.read_parquet(ref / "tiles.parquet")
    assert a.equals(b)
    assert not list((out / "shards").glob(".*tmp*"))


def test_two_worker_processes_give_the_same_bytes(tmp_path, cmu_slide, tcga_slide):
    slides = build_slide_table([_table(tmp_path, cmu_slide, tcga_slide, n=2)])
    cfg = TileConfig(tiles=30, seed=2, shard_size=9)
    run_tile(slides, tmp_path / "one", cfg, workers=1)
    run_tile(slides, tmp_path / "two", cfg, workers=2)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")


def test_merge_streams_parts_and_refuses_a_slide_in_two_parts(tmp_path):
    from cytosyn_data.run.synthetic import synthetic_tables

    slides, tiles = synthetic_tables(1200, tiles_per_slide=100)
    for i in range(3):
        mine = slides[i * 4 : (i + 1) * 4]
        part = tiles.filter(pl.col("slide_id").is_in(mine["slide_id"].implode()))
        mine.write_parquet(tmp_path / f"slides-part{i:04d}of0003.parquet")
        part.write_parquet(tmp_path / f"tiles-part{i:04d}of0003.parquet")
        part.select("key", "x").write_parquet(tmp_path / f"candidates-part{i:04d}of0003.parquet")
    assert merge_parts(tmp_path) == {"slides": 12, "candidates": 1200, "tiles": 1200}
    merged = pl.read_parquet(tmp_path / "tiles.parquet")
    assert merged.equals(tiles)  # parts in order, rows as written
    slides[:5].write_parquet(tmp_path / "slides-part0001of0003.parquet")  # part 0's slides also in part 1
    with pytest.raises(RuntimeError, match=r"slides in two parts, e.g. \['TCGA-00-00000-01Z-00-DX1', "):
        merge_parts(tmp_path)
