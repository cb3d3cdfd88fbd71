"""Synthetic tile runs at any scale, with the exact table schemas, for scale benchmarks and tests.

``make_run(folder, n_tiles, tiles_per_slide)`` writes what ``cytosyn-data tile`` would:
slides.parquet, tiles.parquet (TILES_SCHEMA) and tar shards of ``{key}.png`` (tiny but valid
PNGs, one of a pool of 1,024) + ``{key}.json`` members, in the tile stage's member order. Slides
are spread over TSS sites, projects and patients (two slides per patient); tiles lie on a grid
with neighbours touching, as real 224-px tiles at 0.5 um/px read from a 0.25 um/px level 0.
No slide files exist (``path`` points nowhere): stages that re-read slides cannot run on it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import polars as pl

from cytosyn_data.io.atomic import atomic_write_bytes, write_parquet_atomic
from cytosyn_data.io.png import encode_png
from cytosyn_data.io.tar_write import TarAppender
from cytosyn_data.run.paths import DetectFiles
from cytosyn_data.run.schemas import SLIDES_SCHEMA, TILES_SCHEMA

FOOTPRINT = 448  # level-0 px of a 224-px tile at 0.5 um/px over 0.25 um/px


def _png_pool(n: int = 1024) -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]


def synthetic_tables(n_tiles: int, tiles_per_slide: int, shard_size: int = 500, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """slides and tiles tables of ``n_tiles`` tiles on ``ceil(n_tiles / tiles_per_slide)`` slides."""
    n_slides = -(-n_tiles // tiles_per_slide)
    sid = np.arange(n_slides)
    tss = [f"{i // 2 % 97:02X}" for i in sid]
    patient = [f"TCGA-{t}-{i // 2:05d}" for t, i in zip(tss, sid)]
    slide_ids = [f"{p}-01Z-00-DX{i % 2 + 1}" for p, i in zip(patient, sid)]
    project = [f"TCGA-P{i % 7}" for i in sid]
    slides = pl.DataFrame({"slide_id": slide_ids, "path": [f"/nonexistent/{s}.svs" for s in slide_ids],
                           "backend": "synthetic", "tss": tss, "project": project, "patient": patient,
                           "read_level": 0, "native": True, "footprint": float(FOOTPRINT), "status": "ok",
                           "width": int(np.ceil(np.sqrt(tiles_per_slide))) * FOOTPRINT,
                           "height": int(np.ceil(np.sqrt(tiles_per_slide))) * FOOTPRINT,
                           "mpp": 0.25, "n_candidates": tiles_per_slide, "n_selected": tiles_per_slide},
                          ).with_columns(n_selected=pl.when(pl.int_range(pl.len()) == n_slides - 1)
                                         .then(n_tiles - (n_slides - 1) * tiles_per_slide).otherwise("n_selected"))
    slides = pl.DataFrame(schema=SLIDES_SCHEMA).vstack(slides.select(
        [pl.col(c).cast(SLIDES_SCHEMA[c]) if c in slides.columns else pl.lit(None, SLIDES_SCHEMA[c]).alias(c)
         for c in SLIDES_SCHEMA]))
    i = np.arange(n_tiles)
    s, j = i // tiles_per_slide, i % tiles_per_slide
    side = int(np.ceil(np.sqrt(tiles_per_slide)))
    x, y = (j % side) * FOOTPRINT, (j // side) * FOOTPRINT
    rng = np.random.default_rng(seed)
    idx = pl.DataFrame({"s": s})
    tiles = idx.join(slides.with_row_index("s").select(pl.col("s").cast(pl.Int64), "slide_id", "tss", "project",
                                                        "patient"), on="s", how="left", maintain_order="left")
    tiles = tiles.with_columns(
        key=pl.format("{}__x{}_y{}", "slide_id", pl.Series(x), pl.Series(y)), slide_type=pl.lit("DX"),
        x=pl.Series(x), y=pl.Series(y), footprint=float(FOOTPRINT), level_x=pl.Series(x), level_y=pl.Series(y),
        region=FOOTPRINT, downsample=1.0, mpp=0.5, read_level=0, resample=pl.lit("area"),
        tissue_fraction=pl.Series(rng.uniform(0.3, 1, n_tiles)),
        shard=pl.format("tiles-{}.tar", (pl.int_range(pl.len()) // shard_size).cast(pl.String).str.zfill(6)),
        sha256=pl.lit(""), qc_tissue=pl.Series(rng.uniform(0.3, 1, n_tiles)),
        qc_blur=pl.Series(rng.uniform(0, 500, n_tiles)), qc_saturation=pl.Series(rng.uniform(0, 1, n_tiles)),
        qc_brightness=pl.Series(rng.uniform(0, 1, n_tiles)), qc_pen=pl.Series(rng.uniform(0, 0.1, n_tiles)))
    return slides, tiles.select(list(TILES_SCHEMA)).cast(TILES_SCHEMA)


def make_run(folder: str | Path, n_tiles: int, tiles_per_slide: int = 4000, shard_size: int = 500, seed: int = 0,
             pictures: int = 0) -> Path:
    """Write a synthetic tile run (tables, candidates.parquet and shards) into ``folder``; returns it.
    ``pictures``: also detection's pictures of the first ``pictures`` slides (for the report)."""
    out = Path(folder)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    slides, tiles = synthetic_tables(n_tiles, tiles_per_slide, shard_size, seed)
    pool = _png_pool()
    pool_sha = [hashlib.sha256(p).hexdigest() for p in pool]
    pick = np.random.default_rng(seed + 1).integers(0, len(pool), n_tiles)
    tiles = tiles.with_columns(sha256=pl.Series([pool_sha[k] for k in pick]))
    for (shard,), part in tiles.with_columns(_pick=pl.Series(pick)).group_by("shard", maintain_order=True):
        with TarAppender(out / "shards" / shard) as tar:
            for k, row in zip(part["_pick"], part.drop("_pick").iter_rows(named=True)):
                tar.add(f"{row['key']}.png", pool[k])
                tar.add(f"{row['key']}.json", json.dumps(row, sort_keys=True).encode())
            tar.commit()
    write_parquet_atomic(slides, out / "slides.parquet")
    write_parquet_atomic(tiles, out / "tiles.parquet")
    cand = tiles.select("key", "slide_id", "x", "y", "tissue_fraction", selected=pl.lit(True))
    write_parquet_atomic(cand, out / "candidates.parquet")
    if pictures:
        write_detect_pictures(out, slides.head(pictures), seed)
    return out


def write_detect_pictures(out: Path, slides: pl.DataFrame, seed: int = 0) -> None:
    """Detection's per-slide pictures (thumbnail, mask, view) as small synthetic images, so the run's
    report draws every slide: a pink disc of 'tissue' on glass, 128 px on its long side."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:128, :128]
    disc = (xx - 64) ** 2 + (yy - 64) ** 2 < 50 ** 2
    for sid in slides["slide_id"]:
        files = DetectFiles.of_run(out, sid)
        files.folder.mkdir(parents=True, exist_ok=True)
        img = np.full((128, 128, 3), 240, np.uint8)
        img[disc] = rng.integers((150, 40, 120), (230, 140, 210), (int(disc.sum()), 3), dtype=np.uint8)
        atomic_write_bytes(files.thumb, encode_png(img), durable=False)
        atomic_write_bytes(files.mask, encode_png(np.repeat((disc * 255).astype(np.uint8)[..., None], 3, 2)), durable=False)
        atomic_write_bytes(files.view, cv2.imencode(".jpg", img[..., ::-1])[1].tobytes(), durable=False)

