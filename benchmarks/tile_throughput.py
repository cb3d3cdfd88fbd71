"""Tiles/s per core of the whole `cytosyn-data tile` stage against the naive loop.

The naive loop reads every selected tile with one openslide ``read_region`` call and
encodes it with Pillow's default PNG settings (then writes it to a tar). Both run in this
process on one core over K copies of ../shared/data/wsi/cmu-1-small-region.svs (listed in a
slide table with distinct slide_ids), so the figures are comparable.

    python benchmarks/tile_throughput.py [--copies 20]
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import openslide
import polars as pl

from cytosyn_data.slide_table import build_slide_table
from cytosyn_data.tile_stage import TileConfig, run_tile
from cytosyn_data.tissue import tissue_mask
from cytosyn_data.wsi import open_slide

SLIDE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wsi" / "cmu-1-small-region.svs"


def naive(tiles: pl.DataFrame, slide_path: Path, out: Path) -> float:
    t = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for sid, part in tiles.group_by("slide_id", maintain_order=True):
            s = openslide.OpenSlide(str(slide_path))
            for x, y, key in zip(part["x"], part["y"], part["key"]):
                img = s.read_region((int(x), int(y)), 0, (224, 224)).convert("RGB")
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                info = tarfile.TarInfo(f"{key}.png")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
            s.close()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--workers", type=int, default=1, help="processes for the stage (figures are divided by it)")
    args = ap.parse_args()
    slide = SLIDE.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = tmp / "slides.csv"
        pl.DataFrame({"path": [str(slide)] * args.copies, "slide_id": [f"cmu-copy{i:03d}" for i in range(args.copies)]}).write_csv(table)
        slides = build_slide_table([table])
        t = time.perf_counter()
        res = run_tile(slides, tmp / "out", TileConfig(tiles=None, shard_size=500), workers=args.workers)
        stage_s = time.perf_counter() - t
        tiles = pl.read_parquet(tmp / "out" / "tiles.parquet").sort("key")
        naive_s = naive(tiles, slide, tmp / "naive.tar")
        with open_slide(slide) as s:
            thumb = s.thumbnail((139, 185))
        t = time.perf_counter()
        for _ in range(20):
            tissue_mask(thumb, 8.0)
        mask_s = (time.perf_counter() - t) / 20
        t = time.perf_counter()
        for _ in range(5):
            with open_slide(slide) as s:
                s.thumbnail((139, 185))
        thumb_s = (time.perf_counter() - t) / 5
    n = res.n_tiles
    w = args.workers
    print(f"slides: {args.copies} copies of {slide.name}; tiles: {n}; workers: {w} (os.cpu_count={os.cpu_count()})")
    print(f"cytosyn-data tile (whole stage): {stage_s:.2f} s -> {n / stage_s:.0f} tiles/s, {n / stage_s / w:.0f} tiles/s per core")
    print("  phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in res.seconds.items()))
    print(f"  extract+shard only: {n / (res.seconds['extract'] + res.seconds['shard']) / w:.0f} tiles/s per core")
    print(f"naive loop (read_region per tile + Pillow PNG default): {naive_s:.2f} s -> {n / naive_s:.0f} tiles/s per core")
    print(f"speed-up vs naive (per core): {naive_s / (stage_s * w):.2f}x; wall-clock: {naive_s / stage_s:.2f}x")
    print(f"tissue detection per slide: thumbnail {thumb_s:.3f} s + mask {mask_s:.3f} s = {thumb_s + mask_s:.3f} s")


if __name__ == "__main__":
    main()
