"""Scale benchmark: time and peak memory of each stage's table logic and of the split, at growing
tile counts, on synthetic runs (real tar shards of tiny PNG + JSON members, tables with the exact
schemas; cytosyn_data.run.synthetic). Prints, in one run, per stage and size: seconds, tiles per
second, peak RSS (the process and its workers), and the growth from the smallest size (time and
RSS ratios; linear is 10x time per 10x tiles); at the smallest size the direct in-memory path
(tests/split_oracle.py, the code before the scale work) runs too, for the ratio.

    python benchmarks/scale.py                       # 100k and 1M tiles
    python benchmarks/scale.py --sizes 100000 1000000 10000000

Each measurement runs in a fresh child process, after an unmeasured one that builds the stage's
synthetic inputs (part tables, detect files, feature files). Runs are cached in --work (default
~/.cache/cytosyn-bench/scale; about 2.2 GB per million tiles).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tile-tables", "merge", "assign", "split", "curate-apply", "eval-features", "train-resume")
TILES_PER_SLIDE = 4000  # 40M tiles / 10k slides
#: stages whose inputs (part tables, detect files, feature files) are built by a first child, unmeasured
SETUP = ("merge", "tile-tables", "curate-apply", "eval-features")
SETUP_ONLY = bool(os.environ.get("CYTOSYN_BENCH_SETUP"))


# --------------------------------------------------------------------------- stages (run in a child)
def stage_assign(run: Path, work: Path) -> dict:
    """The split's assignment as `cytosyn-data split` runs it: chunks of whole slides, the
    splits table streamed, the audit by aggregations."""
    import polars as pl

    from cytosyn_data.split.assign import assign_run
    from cytosyn_data.split.audit import audit_parts
    from cytosyn_data.split.config import SplitConfig
    from cytosyn_data.split.stage import write_splits_table

    a = assign_run(run, work / "assign", SplitConfig(), None)
    write_splits_table(a, work / "splits.parquet")
    assert audit_parts(pl.scan_parquet(work / "splits.parquet"), a.overlaps)["ok"]
    return {"tiles": a.n_tiles}


def stage_assign_naive(run: Path, work: Path) -> dict:
    import polars as pl

    sys.path.insert(0, str(ROOT / "tests"))
    import split_oracle

    from cytosyn_data.split.config import SplitConfig

    tiles = pl.read_parquet(run / "tiles.parquet")
    split_oracle.assign_splits(pl.read_parquet(run / "slides.parquet"), tiles, None, SplitConfig())
    return {"tiles": tiles.height}


def stage_split(run: Path, work: Path) -> dict:
    from cytosyn_data.cli import main

    out = work / "split"
    shutil.rmtree(out, ignore_errors=True)
    assert main(["split", "--run", str(run), "--out", str(out), "--workers", "2"]) == 0
    return {"tiles": json.loads((out / "counts.json").read_text())["train"]}


def stage_split_naive(run: Path, work: Path) -> dict:
    import polars as pl

    sys.path.insert(0, str(ROOT / "tests"))
    import split_oracle

    from cytosyn_data.split.config import SplitConfig

    out = work / "split_naive"
    shutil.rmtree(out, ignore_errors=True)
    cfg = SplitConfig()
    tiles = pl.read_parquet(run / "tiles.parquet")
    splits = split_oracle.assign_splits(pl.read_parquet(run / "slides.parquet"), tiles, None, cfg)
    counts = split_oracle.write_split_shards(splits, sorted((run / "shards").glob("*.tar")), out, cfg)
    return {"tiles": counts["train"]}


def stage_merge(run: Path, work: Path) -> dict:
    """cytosyn-data merge of 8 part tables (candidates = tiles.parquet's rows, as many)."""
    import polars as pl

    from cytosyn_data.tile.merge import merge_parts

    out = work / "merge"
    if not (out / "tiles-part0007of0008.parquet").exists():
        out.mkdir(parents=True, exist_ok=True)
        slides, tiles = pl.read_parquet(run / "slides.parquet"), pl.read_parquet(run / "tiles.parquet")
        for i in range(8):
            mine = slides.filter(pl.int_range(pl.len()) % 8 == i)
            part = tiles.filter(pl.col("slide_id").is_in(mine["slide_id"].implode()))
            sfx = f"-part{i:04d}of0008"
            mine.write_parquet(out / f"slides{sfx}.parquet")
            part.write_parquet(out / f"tiles{sfx}.parquet")
            part.select("key", "slide_id", "x", "y", "tissue_fraction").write_parquet(out / f"candidates{sfx}.parquet")
        del tiles
    if SETUP_ONLY:
        return {"tiles": 0}
    return {"tiles": merge_parts(out)["tiles"]}


def stage_tile_tables(run: Path, work: Path) -> dict:
    """The tile stage's table logic without pixels: per-slide selection and plan files, shard cuts
    and unit digests, each shard's table (as a worker writes it) and the streamed tiles/candidates."""
    import numpy as np
    import polars as pl

    from cytosyn_data.tile import stage as T
    from cytosyn_data.io.png import encode_png
    from cytosyn_data.tile.plan import shard_cuts, shard_units, slide_quotas

    out = work / "tile_tables"
    det = out / "work" / "detect"
    slides = pl.read_parquet(run / "slides.parquet")
    if not (det / "done").exists():
        det.mkdir(parents=True, exist_ok=True)
        tiles = pl.read_parquet(run / "tiles.parquet", columns=["key", "slide_id", "x", "y", "tissue_fraction"])
        pic = encode_png(np.zeros((8, 8, 3), np.uint8))
        for (sid,), part in tiles.group_by("slide_id"):
            part.with_columns(col=(pl.col("x") // 448).cast(pl.Int32), row=(pl.col("y") // 448).cast(pl.Int32)).write_parquet(
                det / f"{sid}.parquet")
            (det / f"{sid}.thumb.png").write_bytes(pic)
            (det / f"{sid}.mask.png").write_bytes(pic)
        (det / "done").touch()
        del tiles
    if SETUP_ONLY:
        return {"tiles": 0}
    info = {"status": "ok", "downsample": 1.0, "footprint": 448.0, "region": 448, "read_level": 0, "native": True,
            "width": 100_000, "path": "/nonexistent", "file": {}, "fast_reads": False, "level_dimensions": [[1, 1]],
            "level_downsamples": [1.0], "level_mpp": [0.25]}
    rows = [{**r, "slide_type": "DX"} for r in slides.select("slide_id", "path", "tss", "project", "patient").to_dicts()]
    infos = {r["slide_id"]: {**info, "n_candidates": n} for r, n in zip(rows, slides["n_selected"])}
    cfg = T.TileConfig(tiles=None, shard_size=500)
    quota_of, _ = slide_quotas(rows, infos, None, cfg.seed)
    counts, digests, _ = T._select_phase(rows, infos, quota_of, cfg, out)
    cuts = shard_cuts(counts, cfg.seed, cfg.shard_size, "tiles")
    dirs = {"shard_dir": out / "shards", "plans_dir": out / "work" / "shard_plans", "select_dir": out / "work" / "select"}
    dirs["plans_dir"].mkdir(parents=True, exist_ok=True)
    for u in shard_units(cuts, infos, {"tile_size": 224}, digests, dirs):  # a worker's table, without pixels
        r = u.load_rows()
        r.with_columns(sha256=pl.lit(""), **{c: pl.lit(0.5, pl.Float32) for c in
                                              ("qc_tissue", "qc_blur", "qc_saturation", "qc_brightness", "qc_pen")}) \
            .select(list(T.TILES_SCHEMA)).cast(T.TILES_SCHEMA).write_parquet(dirs["plans_dir"] / f"{u.name}.parquet")
    n, _ = T._concat_tables(out, "", [name for name, _ in cuts], [r["slide_id"] for r in rows])
    return {"tiles": n}


def random_features(path: Path, n: int, dim: int) -> None:
    """A float32 [n, dim] standard-normal feature file (seeded), written batch by batch unless present."""
    import numpy as np

    from cytosyn_data.io.feature_file import FeatureFileWriter

    if path.exists():
        return
    rng = np.random.default_rng(0)
    with FeatureFileWriter(path) as fw:
        for lo in range(0, n, 100_000):
            fw.append(rng.standard_normal((min(100_000, n - lo), dim), dtype=np.float32))


def stage_curate_apply(run: Path, work: Path, naive: bool = False) -> dict:
    """Probe scores of every tile from a memory-mapped 384-d feature file, the curation table and
    the removal report (naive: the whole file loaded, float64 in one go)."""
    import numpy as np
    import polars as pl

    from cytosyn_data.curate import probes as P, sheets

    n = pl.scan_parquet(run / "tiles.parquet").select(pl.len()).collect().item()
    feats = work / "curate_features.npy"
    if not (work / "curate_keys.parquet").exists():
        pl.read_parquet(run / "tiles.parquet", columns=["key"]).write_parquet(work / "curate_keys.parquet")
    random_features(feats, n, 384)
    if SETUP_ONLY:
        return {"tiles": 0}
    rng = np.random.default_rng(1)
    probes = [(rng.normal(size=384), rng.uniform(0.5, 2, 384), rng.normal(size=384) / 20, 0.0) for _ in range(5)]
    if naive:  # the whole file in float64, every table in memory
        keys = pl.read_parquet(run / "tiles.parquet", columns=["key"])["key"]
        x = np.load(feats).astype(np.float64)
        p = np.stack([1 / (1 + np.exp(-(((x - m) / s) @ w + b))) for m, s, w, b in probes], axis=1)
        cur = pl.DataFrame({"key": keys, "artifact_prob": p.mean(1)}).with_columns(keep=pl.col("artifact_prob") < 0.5)
        tiles = pl.read_parquet(run / "tiles.parquet", columns=["key", "shard"])
    else:  # as `curate apply`: chunks of rows into curation.parquet, the report and sheets from it lazily
        P.apply_probes_to_file(work / "curate_keys.parquet", np.load(feats, mmap_mode="r"), probes, 0.5,
                               work / "curation.parquet")
        cur = pl.scan_parquet(work / "curation.parquet")
        tiles = pl.scan_parquet(run / "tiles.parquet").select("key", "shard")
    sheets.removal_report(cur, pl.read_parquet(run / "slides.parquet"))
    top = cur.top_k(64, by="artifact_prob").lazy().collect()
    got = sheets.pngs_for(run / "shards", top["key"].to_list(), tiles.lazy().join(top.lazy(), on="key", how="semi").collect())
    assert len(got) == 64
    return {"tiles": n}


def stage_eval_features(run: Path, work: Path) -> dict:
    """eval's per-set work after extraction, on a memory-mapped 256-d feature file of every tile:
    streaming moments (FD), a 50k-row subsample for the k-NN metrics, reference pairs by join."""
    import numpy as np
    import polars as pl

    from cytosyn_model.eval.metrics import mean_cov
    from cytosyn_model.eval.features import subsample
    from cytosyn_model.eval.run import reference_pairs

    n = pl.scan_parquet(run / "tiles.parquet").select(pl.len()).collect().item()
    path = work / "eval_features.npy"
    random_features(path, n, 256)
    if SETUP_ONLY:
        return {"tiles": 0}
    x = np.load(path, mmap_mode="r")
    mean_cov(x)
    subsample(x, 50_000, 0)
    keys = pl.read_parquet(run / "tiles.parquet", columns=["key"])["key"]
    gen = [f"gen__{k}__s0_{i}" for i, k in enumerate(keys.head(10_000).to_list())]
    ri, _ = reference_pairs(keys, gen)
    assert len(ri) == len(gen)
    return {"tiles": n}


def stage_train_resume(run: Path, work: Path) -> dict:
    """Time to the first sample of a resumed loader stream, 90% of the way through one pass over
    the split's train shards (VisitStream seeks by sample counts; it replays at most one shard)."""
    import polars as pl

    from cytosyn_model.data import VisitStream

    urls = sorted(str(p) for p in (work / "split" / "train").glob("*.tar"))
    if not urls:
        raise SystemExit("train-resume needs the split stage's output: run the split stage first")
    n = pl.scan_parquet(run / "tiles.parquet").select(pl.len()).collect().item()
    next(iter(VisitStream(urls, seed=0, skip=int(0.9 * n), shuffle_buffer=1000)()))
    return {"tiles": int(0.9 * n)}


def stage_train_resume_naive(run: Path, work: Path) -> dict:
    """The same position reached by replaying the stream (what resume did before)."""
    import itertools

    import polars as pl

    from cytosyn_model.data import VisitStream

    urls = sorted(str(p) for p in (work / "split" / "train").glob("*.tar"))
    n = pl.scan_parquet(run / "tiles.parquet").select(pl.len()).collect().item()
    next(itertools.islice(VisitStream(urls, seed=0, skip=0, shuffle_buffer=1000)(), int(0.9 * n), None))
    return {"tiles": int(0.9 * n)}


#: modules imported before the clock starts (torch alone takes seconds)
PRELOAD = {"curate-apply": "cytosyn_data.curate.stage", "eval-features": "cytosyn_model.eval.run",
           "train-resume": "cytosyn_model.data", "split": "cytosyn_data.cli", "assign": "cytosyn_data.split.stage",
           "merge": "cytosyn_data.tile.stage", "tile-tables": "cytosyn_data.tile.stage"}


def child(stage: str, run: Path, work: Path) -> None:
    import importlib

    importlib.import_module(PRELOAD[stage.removesuffix("-naive")])
    fn = {"assign": stage_assign, "assign-naive": stage_assign_naive, "split": stage_split,
          "split-naive": stage_split_naive, "merge": stage_merge, "tile-tables": stage_tile_tables,
          "curate-apply": stage_curate_apply, "curate-apply-naive": lambda r, w: stage_curate_apply(r, w, True),
          "eval-features": stage_eval_features, "train-resume": stage_train_resume,
          "train-resume-naive": stage_train_resume_naive}[stage]
    t = time.perf_counter()
    res = fn(run, work)
    res["seconds"] = time.perf_counter() - t
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    res["peak_rss_mib"] = rss / 1024
    print("RESULT " + json.dumps(res))


# --------------------------------------------------------------------------- driver
def ensure_run(work: Path, n: int) -> Path:
    from cytosyn_data.run.synthetic import make_run

    run = work / f"run_{n}"
    if not (run / "tiles.parquet").exists():
        t = time.perf_counter()
        shutil.rmtree(run, ignore_errors=True)
        make_run(run, n, tiles_per_slide=TILES_PER_SLIDE)
        print(f"built a synthetic run of {n:,} tiles in {time.perf_counter() - t:.0f} s: {run}", flush=True)
    return run


def measure(stage: str, run: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--run", str(run), "--work", str(work)]
    if stage.removesuffix("-naive") in SETUP:
        subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CYTOSYN_BENCH_SETUP": "1"},
                       check=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "cytosyn-bench" / "scale")
    ap.add_argument("--child")
    ap.add_argument("--run", type=Path)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.run, args.work)
    results = {}
    for n in sorted(args.sizes):
        run = ensure_run(args.work, n)
        work = args.work / f"work_{n}"
        work.mkdir(parents=True, exist_ok=True)
        stages = list(args.stages)
        if n == min(args.sizes):  # the direct path, for the ratio
            stages += [f"{s}-naive" for s in ("assign", "split", "curate-apply", "train-resume") if s in args.stages]
        for stage in stages:
            r = measure(stage, run, work)
            results[(stage, n)] = r
            print(f"{stage:20s} {n:>11,} tiles  {r['seconds']:8.1f} s  {n / r['seconds']:>11,.0f} tiles/s  "
                  f"peak RSS {r['peak_rss_mib']:8.0f} MiB", flush=True)
    summary(results, sorted(args.sizes))


def summary(results: dict, sizes: list[int]) -> None:
    lo, hi = sizes[0], sizes[-1]
    print(f"\n| stage | {' | '.join(f'{n:,} tiles: s / peak MiB' for n in sizes)} | time growth {lo:,} -> {hi:,} "
          f"| RSS growth | naive at {lo:,}: s / MiB |")
    print("| --- " * (len(sizes) + 4) + "|")
    for stage in STAGES:
        if (stage, lo) not in results:
            continue
        cells = [f"{results[(stage, n)]['seconds']:.1f} / {results[(stage, n)]['peak_rss_mib']:.0f}" for n in sizes]
        a, b = results[(stage, lo)], results[(stage, hi)]
        naive = results.get((f"{stage}-naive", lo))
        ncell = (f"{naive['seconds']:.1f} / {naive['peak_rss_mib']:.0f} ({naive['seconds'] / a['seconds']:.1f}x time)"
                 if naive else "")
        print(f"| {stage} | {' | '.join(cells)} | {b['seconds'] / a['seconds']:.1f}x "
              f"| {b['peak_rss_mib'] / a['peak_rss_mib']:.1f}x | {ncell} |")


if __name__ == "__main__":
    main()
