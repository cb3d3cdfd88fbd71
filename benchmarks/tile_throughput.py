"""Tiles per CPU-second of `cytosyn-data tile` on one large Aperio-style slide, against the limit
pipeline and the naive loop, the wall speed-up of 2 workers on that one slide, and peak RSS.

The slide (cached under ~/.cache/cytosyn-bench/) is a 40x Aperio-style SVS: 40000 x 30000 pixels
at 0.25 microns per pixel, 240 x 240 YCbCr JPEG tiles (quality 80), pyramid levels 1, 4, 16 and an
Aperio ImageDescription, whose tissue is real H&E texture: the tissue-rich part of the CMU-1 small region of
../shared/data/wsi (:data:`TEXTURE`), upsampled 2x and mirrored over three lobes of tissue on
white glass, as in a resection slide.

Every configuration runs in a child process; CPU seconds (user + system) and peak RSS are that
child's (its workers included), so the figures compare:

- cytosyn: ``run_tile`` (detect + write shards, default settings, ``--tiles all``);
- limit: the practical limit pipeline - each source JPEG tile decoded once (libjpeg-turbo),
  cv2 INTER_AREA 448 -> 224, fpng, a plain tar - over the same tiles;
- naive: openslide ``read_region`` per tile + Pillow resize and PNG (default settings) + tar,
  timed on a sample of tiles.

The same command is also timed on a cohort: ``--cohort N`` copies of the slide (symbolic links,
N slides of one run), with 1 and with ``--workers`` workers.

    python benchmarks/tile_throughput.py [--naive-tiles 400] [--workers 2] [--repeats 3] [--cohort 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT / ".." / "shared" / "data" / "wsi" / "cmu-1-small-region.svs"
CACHE = Path(os.environ.get("CYTOSYN_BENCH_CACHE", Path.home() / ".cache" / "cytosyn-bench"))
W, H, TILE = 40000, 30000, 240
TEXTURE = (900, 700, 660, 2260)  # x, y, width, height in the CMU-1 small region: ~85% tissue


def make_slide(path: Path) -> Path:
    """Write the benchmark SVS (see the module doc) tile by tile; memory stays small."""
    import cv2
    import tifffile

    from cytosyn_data.wsi.slide import open_slide

    with open_slide(CMU) as s:
        tex = s.read_rgb(TEXTURE[:2], 0, TEXTURE[2:])  # its tissue-rich part: lobes of solid tissue
    tex = cv2.resize(tex, (tex.shape[1] * 2, tex.shape[0] * 2), interpolation=cv2.INTER_CUBIC)
    tex = np.concatenate([tex, tex[:, ::-1]], 1)
    tex = np.concatenate([tex, tex[::-1]], 0)  # mirrored: seamless when repeated
    lobes = [(0.3, 0.35, 0.24, 0.3), (0.68, 0.55, 0.27, 0.36), (0.4, 0.8, 0.2, 0.14)]  # cx, cy, rx, ry (fractions)

    def level_tiles(f: int):
        lw, lh = -(-W // f), -(-H // f)
        t = cv2.resize(tex, (tex.shape[1] // f, tex.shape[0] // f), interpolation=cv2.INTER_AREA) if f > 1 else tex
        for ty in range(-(-lh // TILE)):
            for tx in range(-(-lw // TILE)):
                yy, xx = np.mgrid[ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE]
                inside = np.zeros(yy.shape, bool)
                for cx, cy, rx, ry in lobes:
                    inside |= ((xx / lw - cx) / rx) ** 2 + ((yy / lh - cy) / ry) ** 2 < 1
                tile = np.full((TILE, TILE, 3), 242, np.uint8)
                src = t[yy % t.shape[0], xx % t.shape[1]]
                tile[inside] = src[inside]
                yield tile

    desc = f"Aperio Image Library v12.0.15 \r\n{W}x{H} [0,0 {W}x{H}] (240x240) JPEG/RGB Q=80|AppMag = 40|MPP = 0.2500"
    tmp = path.with_suffix(".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for i, f in enumerate((1, 4, 16)):
            shape = (-(-H // f), -(-W // f), 3)
            tif.write(level_tiles(f), shape=shape, dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      compression="jpeg", compressionargs={"level": 80}, subsampling=(2, 2), description=desc if i == 0 else None,
                      subfiletype=0 if i == 0 else 1, metadata=None)
    with open_slide(tmp) as s:  # RGB in, YCbCr JPEG out: the glass must read back white
        glass = s.read_rgb((0, 0), 0, (TILE, TILE)).reshape(-1, 3).mean(0)
    if np.abs(glass - 242).max() > 2:
        raise RuntimeError(f"{tmp}: the glass reads back as {glass.round()}, not (242, 242, 242)")
    tmp.rename(path)
    return path


def cohort_dir(tmp: str, slide: Path, n: int) -> str:
    """A folder of ``n`` symbolic links to ``slide`` (slides c0.svs, c1.svs, ...)."""
    folder = Path(tmp) / f"cohort{n}"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        if not (folder / f"c{i}.svs").exists():
            (folder / f"c{i}.svs").symlink_to(slide)
    return str(folder)


def child_cytosyn(slide: str, out: str, workers: int) -> dict:
    from cytosyn_data.run.slide_table import build_slide_table
    from cytosyn_data.tile.config import TileConfig
    from cytosyn_data.tile.stage import run_tile

    res = run_tile(build_slide_table([slide]), out, TileConfig(tiles=None), workers=workers)
    return {"tiles": res.n_tiles, "seconds": res.seconds, "shards": res.n_shards}


def child_limit(slide: str, out: str, tiles_file: str) -> dict:
    """Decode each level-0 JPEG tile once, band by band; resize, fpng, tar."""
    import tarfile

    import cv2
    import imagecodecs
    import polars as pl
    import tifffile

    from cytosyn_data.io.png import encode_png

    tiles = pl.read_parquet(tiles_file).sort(["y", "x"])
    tf = tifffile.TiffFile(slide)
    page = tf.pages[0]
    across = -(-page.imagewidth // TILE)
    fh = tf.filehandle
    decoded: dict[int, np.ndarray] = {}
    with open(out, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for (y,), band in tiles.group_by("y", maintain_order=True):
            rows = range(y // TILE, (y + 447) // TILE + 1)
            decoded = {k: v for k, v in decoded.items() if k // across in rows}
            for x, key in zip(band["x"].to_list(), band["key"].to_list()):
                region = np.empty((448, 448, 3), np.uint8)
                for ty in rows:
                    for tx in range(x // TILE, (x + 447) // TILE + 1):
                        i = ty * across + tx
                        if i not in decoded:
                            fh.seek(page.dataoffsets[i])
                            decoded[i] = imagecodecs.jpeg8_decode(fh.read(page.databytecounts[i]), tables=page.jpegtables,
                                                                   colorspace=3, outcolorspace=2)
                        x0, y0 = max(x, tx * TILE), max(y, ty * TILE)
                        x1, y1 = min(x + 448, (tx + 1) * TILE), min(y + 448, (ty + 1) * TILE)
                        region[y0 - y:y1 - y, x0 - x:x1 - x] = decoded[i][y0 - ty * TILE:y1 - ty * TILE, x0 - tx * TILE:x1 - tx * TILE]
                png = encode_png(cv2.resize(region, (224, 224), interpolation=cv2.INTER_AREA))
                info = tarfile.TarInfo(f"{key}.png")
                info.size = len(png)
                import io

                tar.addfile(info, io.BytesIO(png))
    return {"tiles": tiles.height}


def child_naive(slide: str, out: str, tiles_file: str, n: int) -> dict:
    import io
    import tarfile

    import openslide
    import polars as pl
    from PIL import Image

    tiles = pl.read_parquet(tiles_file).sample(n=min(n, pl.read_parquet(tiles_file).height), seed=0)
    s = openslide.OpenSlide(slide)
    with tarfile.open(out, "w") as tar:
        for x, y, key in zip(tiles["x"], tiles["y"], tiles["key"]):
            img = s.read_region((int(x), int(y)), 0, (448, 448)).convert("RGB").resize((224, 224), Image.BOX)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            info = tarfile.TarInfo(f"{key}.png")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return {"tiles": tiles.height}


def measure(args: list[str]) -> dict:
    """Run this script as a child with ``args``; its result plus wall, CPU seconds and peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**json.loads(out.strip().splitlines()[-1]), "wall": wall, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--naive-tiles", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cohort", type=int, default=4, help="also tile N copies of the slide in one run (1: skip)")
    ap.add_argument("--child", nargs="+")
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        fn = {"cytosyn": child_cytosyn, "limit": child_limit, "naive": child_naive}[kind]
        conv = [int(v) if v.isdigit() else v for v in rest]
        res = fn(*conv)
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        print(json.dumps({**res, "rss_gib": peak / 2**20}))
        return
    import tempfile

    CACHE.mkdir(parents=True, exist_ok=True)
    slide = CACHE / "aperio-40x-40000x30000-v2.svs"  # v2: RGB encoded right, solid tissue
    if not slide.exists():
        t = time.perf_counter()
        make_slide(slide)
        print(f"generated {slide} ({slide.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s")
    runs: dict[str, list[dict]] = {"one": [], "many": [], "limit": [], "naive": [], "cohort_one": [], "cohort_many": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):  # interleaved rounds; the medians are printed (this VM is noisy)
            runs["one"].append(measure(["cytosyn", str(slide), f"{tmp}/one{r}", "1"]))
            runs["many"].append(measure(["cytosyn", str(slide), f"{tmp}/many{r}", str(a.workers)]))
            tiles = f"{tmp}/one0/tiles.parquet"
            runs["limit"].append(measure(["limit", str(slide), f"{tmp}/limit.tar", tiles]))
            runs["naive"].append(measure(["naive", str(slide), f"{tmp}/naive.tar", tiles, str(a.naive_tiles)]))
            if a.cohort > 1:  # the same slide under N names: N slides of one run
                runs["cohort_one"].append(measure(["cytosyn", cohort_dir(tmp, slide, a.cohort), f"{tmp}/c1-{r}", "1"]))
                runs["cohort_many"].append(measure(["cytosyn", cohort_dir(tmp, slide, a.cohort), f"{tmp}/c2-{r}",
                                                    str(a.workers)]))
        shards = sorted((Path(tmp) / "one0" / "shards").glob("*.tar"))
        same = all((Path(tmp) / "many0" / "shards" / p.name).read_bytes() == p.read_bytes() for p in shards)
        if a.cohort > 1:
            same = same and all((Path(tmp) / "c2-0" / "shards" / p.name).read_bytes() == p.read_bytes()
                                for p in sorted((Path(tmp) / "c1-0" / "shards").glob("*.tar")))
        shard_bytes = sum(p.stat().st_size for p in shards)
    med = {k: {f: float(np.median([r[f] for r in v])) for f in ("wall", "cpu", "tiles", "rss_gib")} for k, v in runs.items() if v}
    one = runs["one"][0]
    rate = {k: med[k]["tiles"] / med[k]["cpu"] for k in ("one", "limit", "naive")}
    write_one = np.median([r["seconds"]["write"] for r in runs["one"]])
    write_many = np.median([r["seconds"]["write"] for r in runs["many"]])
    print(f"slide: {slide.name}, {one['tiles']} tiles of 224 px at 0.5 MPP in {one['shards']} shards "
          f"({shard_bytes / one['tiles'] / 1024:.0f} KiB per tile with its JSON); os.cpu_count={os.cpu_count()}; "
          f"medians of {a.repeats} rounds")
    print(f"cytosyn, 1 worker:   {rate['one']:7.0f} tiles per CPU-second  (wall {med['one']['wall']:.1f} s, "
          f"detect {one['seconds']['detect']:.2f} s, peak RSS {med['one']['rss_gib']:.2f} GiB)")
    print(f"limit pipeline:      {rate['limit']:7.0f} tiles per CPU-second  (peak RSS {med['limit']['rss_gib']:.2f} GiB)")
    print(f"naive loop:          {rate['naive']:7.0f} tiles per CPU-second  ({runs['naive'][0]['tiles']} tiles sampled)")
    print(f"ratio to the limit:  {rate['one'] / rate['limit']:.2f}   (target >= 0.9); vs naive: {rate['one'] / rate['naive']:.1f}x")
    print(f"{a.workers} workers on this one slide: whole command {med['one']['wall'] / med['many']['wall']:.2f}x "
          f"(wall {med['many']['wall']:.1f} s; target >= 1.8x), write phase {write_one / write_many:.2f}x; "
          f"peak RSS {med['many']['rss_gib']:.2f} GiB (largest process); shards of 1 and {a.workers} workers identical: {same}")
    if a.cohort > 1:
        c1, c2 = med["cohort_one"], med["cohort_many"]
        print(f"cohort of {a.cohort} such slides in one run: 1 worker {c1['tiles'] / c1['cpu']:.0f} tiles per CPU-second "
              f"(ratio to the limit {c1['tiles'] / c1['cpu'] / rate['limit']:.2f}); {a.workers} workers "
              f"{c1['wall'] / c2['wall']:.2f}x wall ({c1['wall']:.1f} s -> {c2['wall']:.1f} s)")
    serial = med["one"]["wall"] - write_one  # interpreter start, imports, detection, tables, reports
    print(f"outside the write phase: {serial:.1f} s of the {med['one']['wall']:.1f} s of 1 worker; with the write "
          f"phase at exactly {a.workers}x the whole command could reach at most "
          f"{med['one']['wall'] / (serial + write_one / a.workers):.2f}x")


if __name__ == "__main__":
    main()
