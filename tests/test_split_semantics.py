"""Split semantics: one key -> read-window mapping at non-integer downsamples (content of edge strips),
val_in allocated over all training slides, curation folds grouped by patient, tissue holes."""

from __future__ import annotations

import numpy as np
import polars as pl
import tifffile
import webdataset as wds

from cytosyn_data.io.png import decode_png
from cytosyn_data.run.slide_table import build_slide_table
from cytosyn_data.split.assign import assign_splits, val_in_quotas
from cytosyn_data.split.audit import audit
from cytosyn_data.split.config import SplitConfig
from cytosyn_data.tile.config import TileConfig
from cytosyn_data.tile.stage import run_tile


def _pink(rng, h, w, disc=True):
    img = np.full((h, w, 3), 245, np.uint8)
    tissue = np.stack([rng.integers(150, 230, (h, w)), rng.integers(40, 140, (h, w)), rng.integers(120, 210, (h, w))], -1)
    yy, xx = np.mgrid[:h, :w]
    inside = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (0.45 * min(h, w)) ** 2 if disc else np.ones((h, w), bool)
    img[inside] = tissue[inside]
    return img


def test_non_integer_downsample_reads_the_exact_level_window(tmp_path):
    """Level 1 of a 4001-px slide is 2000 px (downsample 2.0005): every tile equals its level window
    [level_x, level_x + 224) exactly, so neighbouring tiles share no pixel column, and the audit of
    the read windows finds no overlap between val_in and train."""
    rng = np.random.default_rng(0)
    level1 = _pink(rng, 2000, 2000)
    path = tmp_path / "odd.tif"
    res = 1e4 / 0.25
    with tifffile.TiffWriter(path) as tif:
        opts = dict(tile=(256, 256), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
        tif.write(np.full((4001, 4001, 3), 240, np.uint8), resolution=(res, res), **opts)
        tif.write(level1, subfiletype=1, resolution=(res * 2000 / 4001, res * 2000 / 4001), **opts)
    out = tmp_path / "run"
    r = run_tile(build_slide_table([path]), out, TileConfig(tiles=None))
    assert r.ok and r.n_tiles >= 20
    tiles = pl.read_parquet(out / "tiles.parquet")
    assert (tiles["read_level"] == 1).all() and np.allclose(tiles["downsample"].to_numpy(), 4001 / 2000)
    assert (tiles["level_x"] % 224 == 0).all() and (tiles["level_y"] % 224 == 0).all()
    assert ((tiles["x"] / tiles["downsample"] + 0.5).floor().cast(pl.Int64) == tiles["level_x"]).all()
    pngs = {s["__key__"]: s["png"] for s in wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False)}
    for row in tiles.iter_rows(named=True):
        lx, ly = row["level_x"], row["level_y"]
        np.testing.assert_array_equal(decode_png(pngs[row["key"]]), level1[ly:ly + 224, lx:lx + 224], err_msg=row["key"])
    # x = rint(k * 448.112): a floored read origin would start some tiles one level pixel early
    assert any(int(x // row_ds) % 224 for x, row_ds in zip(tiles["x"], tiles["downsample"]))
    slides = pl.read_parquet(out / "slides.parquet")
    splits = assign_splits(slides, tiles, None, SplitConfig(val_out_fraction=0.0, val_in_fraction=0.3, guidance_tiles=0))
    n_in = splits.filter(pl.col("split") == "val_in").height
    assert n_in == round(0.3 * tiles.height)  # neighbours of train tiles are not excluded
    assert audit(splits, tiles)["ok"]


def _synthetic(n_slides: int, per_slide: int):
    rows, slides = [], []
    for s in range(n_slides):
        sid = f"s{s:02d}"
        slides.append({"slide_id": sid, "status": "ok", "patient": sid, "project": sid, "tss": None})
        for i in range(per_slide):
            rows.append({"key": f"{sid}__x{i * 1000}_y0", "slide_id": sid, "patient": sid, "tss": None, "x": i * 1000,
                         "y": 0, "level_x": i * 1000, "level_y": 0, "region": 224, "downsample": 1.0})
    return pl.DataFrame(slides), pl.DataFrame(rows)


def test_val_in_is_allocated_over_all_training_slides():
    slides, tiles = _synthetic(10, 5)  # 50 tiles: 2% of each 5-tile slide rounds down to 0
    splits = assign_splits(slides, tiles, None, SplitConfig(val_out_fraction=0.0, val_in_fraction=0.02, guidance_tiles=0))
    assert splits.filter(pl.col("split") == "val_in").height == 1
    splits = assign_splits(slides, tiles, None, SplitConfig(val_out_fraction=0.0, val_in_fraction=0.1, guidance_tiles=0))
    per_slide = splits.filter(pl.col("split") == "val_in").group_by("slide_id").len()
    assert per_slide["len"].sum() == 5 and per_slide["len"].max() == 1
    q = val_in_quotas(tiles, SplitConfig(val_in_fraction=0.1))
    assert q["_quota"].sum() == 5


def test_curation_folds_group_by_patient():
    from cytosyn_data.curate.stage import fit_probes, patient_of

    rng = np.random.default_rng(0)
    keys, y = [], []
    for p in range(10):
        for slide in ("01A-01-DX1", "01A-02-TS1"):  # two slides of one TCGA patient
            for i in range(6):
                keys.append(f"TCGA-AA-{p:04d}-{slide}__x{i}_y0")
                y.append(i % 2)
    groups = patient_of(keys)
    assert groups[0] == groups[6] == "TCGA-AA-0000"
    x = rng.normal(size=(len(keys), 8)) + np.array(y)[:, None]
    folds = fit_probes(x, np.array(y), groups, seed=0)["fold_of"]
    by_patient = pl.DataFrame({"p": groups, "f": folds}).group_by("p").agg(pl.col("f").n_unique())
    assert (by_patient["f"] == 1).all()  # a patient's two slides never straddle folds


def test_tissue_mask_keeps_large_enclosed_glass():
    from cytosyn_data.wsi.tissue import tissue_mask

    rng = np.random.default_rng(1)
    img = _pink(rng, 200, 200, disc=False)
    img[40:160, 40:160] = 245  # a 120x120 px glass area (960 x 960 um at 8 MPP) inside tissue
    img[20:24, 20:24] = 245  # a 32 x 32 um gap
    mask = tissue_mask(img, mpp=8.0)
    assert not mask[60:140, 60:140].any()
    assert mask[21, 21] and mask[10, 100]


def test_split_leaves_out_tiles_outside_the_qc_thresholds(tmp_path, cmu_slide, tcga_slide, capsys):
    from conftest import tile_two_slides

    from cytosyn_data.cli import main

    (tmp_path / "run").mkdir()
    run = tile_two_slides(tmp_path / "run", cmu_slide, tcga_slide, "40")
    tiles = pl.read_parquet(run / "tiles.parquet")
    blur = float(tiles["qc_blur"].median())
    assert main(["split", "--run", str(run), "--min-blur", str(blur), "--max-pen", "0.5", "--guidance-tiles", "3"]) == 0
    splits = pl.read_parquet(run / "splits.parquet")
    want = tiles.filter((pl.col("qc_blur") >= blur) & (pl.col("qc_pen") <= 0.5))["key"]
    assert 0 < splits.height <= want.len() < tiles.height and set(splits["key"]) <= set(want)
    assert f"left out by QC thresholds: {tiles.height - want.len()}" in capsys.readouterr().out
    # a tile run without QC columns (made before per-tile QC) names the cause
    tiles.drop("qc_blur").write_parquet(run / "tiles.parquet")
    assert main(["split", "--run", str(run), "--out", str(tmp_path / "s2"), "--min-blur", "1"]) == 1
    assert "no qc_blur column (a tile run made before per-tile QC)" in capsys.readouterr().err
