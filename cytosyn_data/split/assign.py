"""Assignment of tiles to train / val_in / val_out and the guidance subset, chunk by chunk of whole
slides (memory is one chunk and the per-slide plan). The rules are in :mod:`cytosyn_data.split.stage`'s doc."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from cytosyn_data.core.hashing import key_hash, stable_hash
from cytosyn_data.core.quotas import NULL_STRATUM, apportion
from cytosyn_data.run.schemas import SPLITS_SCHEMA, read_windows
from cytosyn_data.split.config import QC_FILTERS, SplitConfig, qc_keep


def choose_val_out(slides: pl.DataFrame, fraction: float, seed: int) -> set[str]:
    """Patients held out: per project, ceil(fraction * patients) (>= 1 when the project has >= 2),
    taken round-robin over TSS strata in the order of a seeded hash."""
    df = slides.filter(pl.col("status") == "ok").with_columns(
        patient=pl.coalesce("patient", "slide_id"),
        project=pl.col("project").fill_null(NULL_STRATUM),
        tss=pl.col("tss").fill_null(NULL_STRATUM),
    )
    held: set[str] = set()
    for (_,), proj in df.group_by("project", maintain_order=True):
        patients = proj.group_by("patient").agg(pl.col("tss").first()).to_dicts()
        n = len(patients)
        if n < 2:
            continue
        want = min(n - 1, max(1, math.ceil(fraction * n)))
        by_tss: dict[str, list[str]] = {}
        for p in sorted(patients, key=lambda r: stable_hash(f"{seed}/val_out/{r['patient']}")):
            by_tss.setdefault(p["tss"], []).append(p["patient"])
        order = sorted(by_tss, key=lambda s: stable_hash(f"{seed}/tss/{s}"))
        while want > 0:
            for s in order:
                if want and by_tss[s]:
                    held.add(by_tss[s].pop(0))
                    want -= 1
    return held


#: level-0 pixels two squares may share without counting as overlap: neighbouring tiles read at a
#: level whose downsample is not an integer (e.g. 2.0005) have rounded level-0 corners.
EPS = 1e-6  # level-0 pixels: windows that only touch do not overlap


def overlapping(a: pl.DataFrame, b: pl.DataFrame) -> pl.DataFrame:
    """Rows of ``a`` whose read window overlaps a read window of ``b`` on the same slide (positive
    area). A join on (slide, grid cell of the window origin, 3x3 neighbourhood), no per-slide loop."""
    if a.height == 0 or b.height == 0:
        return a.head(0)
    wa, wb = read_windows(a), read_windows(b)
    side = max(float(pl.concat([wa, wb]).select((pl.col("x1") - pl.col("x0")).max()).collect().item()), 1.0)
    cells = [pl.col(c0).truediv(side).floor().cast(pl.Int64).alias(c) for c0, c in (("x0", "cx"), ("y0", "cy"))]
    wb = wb.with_columns(cells)
    near = pl.concat([wa.with_columns(cx=cells[0] + dx, cy=cells[1] + dy)
                      for dx in (-1, 0, 1) for dy in (-1, 0, 1)])
    hits = (
        near.join(wb, on=["slide_id", "cx", "cy"], suffix="_b")
        .filter((pl.col("x0") < pl.col("x1_b") - EPS) & (pl.col("x0_b") < pl.col("x1") - EPS)
                & (pl.col("y0") < pl.col("y1_b") - EPS) & (pl.col("y0_b") < pl.col("y1") - EPS))
        .select("key").unique().collect()
    )
    return a.filter(pl.col("key").is_in(hits["key"].implode()))


def val_in_quotas(train: pl.DataFrame, cfg: SplitConfig) -> pl.DataFrame:
    """slide_id -> number of val_in tiles for the training tiles ``train`` (see :func:`slide_quotas`)."""
    return slide_quotas(train.group_by("slide_id").len(), cfg)


def slide_quotas(counts: pl.DataFrame, cfg: SplitConfig) -> pl.DataFrame:
    """slide_id -> number of val_in tiles: ``round(val_in_fraction x training tiles)`` apportioned over
    the training slides (``counts``: slide_id, len) in proportion to their tiles (largest remainder,
    ties by seeded hash)."""
    n = counts.sort("slide_id")
    if n.height == 0:
        return pl.DataFrame(schema={"slide_id": pl.String, "_quota": pl.Int64})
    c = n["len"].to_numpy().astype(np.int64)
    total = int(math.floor(cfg.val_in_fraction * c.sum() + 0.5))
    ties = np.array([stable_hash(f"{cfg.seed}/val_in_slide/{s}") for s in n["slide_id"]], dtype=np.uint64)
    return pl.DataFrame({"slide_id": n["slide_id"], "_quota": apportion(total, c.astype(float), c, ties)})


@dataclass(frozen=True)
class AssignPlan:
    """What the per-slide assignment needs from the whole run (small: per patient, slide, stratum)."""

    held: frozenset  # val_out patients
    quotas: pl.DataFrame  # slide_id, _quota (val_in tiles of each training slide)
    guidance: pl.DataFrame  # stratum, _q (guidance tiles of each TSS stratum)


def kept_tiles(tiles: pl.LazyFrame, curation: pl.LazyFrame | None, cfg: SplitConfig, names: list[str],
               where: str = "tiles.parquet") -> pl.LazyFrame:
    """Tiles within the QC thresholds and not removed by curation, with ``patient`` filled."""
    t = tiles.filter(qc_keep(list(names), cfg, where)).with_columns(patient=pl.coalesce("patient", "slide_id"))
    if curation is not None:
        t = t.join(curation.filter(~pl.col("keep")).select("key"), on="key", how="anti", maintain_order="left")
    return t


def assign_plan(slides: pl.DataFrame, kept: pl.LazyFrame, cfg: SplitConfig) -> AssignPlan:
    """Held-out patients, val_in quota per training slide and guidance quota per TSS stratum, from the
    tiles kept per slide (one streaming aggregation: no per-tile table)."""
    held = frozenset(choose_val_out(slides, cfg.val_out_fraction, cfg.seed))
    per_slide = kept.group_by("slide_id").agg(pl.len(), patient=pl.col("patient").first(),
                                              stratum=pl.col("tss").first().fill_null(NULL_STRATUM)).collect()
    train = per_slide.filter(~pl.col("patient").is_in(list(held)))
    quotas = slide_quotas(train.select("slide_id", "len"), cfg)
    left = (train.join(quotas, on="slide_id").group_by("stratum").agg(n=(pl.col("len") - pl.col("_quota")).sum())
            .filter(pl.col("n") > 0).sort("stratum"))
    n = left["n"].to_numpy().astype(np.int64)
    q = apportion(cfg.guidance_tiles, n.astype(float), n,
                  np.array([stable_hash(f"{cfg.seed}/g/{s}") for s in left["stratum"]], dtype=np.uint64))
    return AssignPlan(held, quotas, pl.DataFrame({"stratum": left["stratum"], "_q": q}, schema={"stratum": pl.String, "_q": pl.Int64}))


def assign_chunk(t: pl.DataFrame, plan: AssignPlan, cfg: SplitConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The split of the kept tiles ``t`` of whole slides: rows with ``split`` (val_in overlapping a
    training tile dropped) and this chunk's guidance candidates (key, stratum, _h: per stratum its
    tiles of lowest (_h, key), at most the stratum's quota)."""
    t = t.with_columns(split=pl.when(pl.col("patient").is_in(list(plan.held))).then(pl.lit("val_out")).otherwise(pl.lit("train")),
                       _h=pl.Series(key_hash(t["key"], f"{cfg.seed}/val_in"), dtype=pl.UInt64))
    # val_in: each training slide gives its tiles of lowest seeded hash, as many as its quota
    t = t.with_columns(_rank=pl.col("_h").rank("ordinal").over("slide_id")).join(plan.quotas, on="slide_id", how="left")
    is_in = (pl.col("split") == "train") & (pl.col("_rank") <= pl.col("_quota").fill_null(0))
    t = t.with_columns(split=pl.when(is_in).then(pl.lit("val_in")).otherwise(pl.col("split")))
    clash = overlapping(t.filter(pl.col("split") == "val_in"), t.filter(pl.col("split") == "train"))
    t = t.filter(~pl.col("key").is_in(clash["key"].implode()))
    cand = top_guidance(t.filter(pl.col("split") == "train").select(
        "key", "_h", stratum=pl.col("tss").fill_null(NULL_STRATUM)), plan)
    return t.drop("_h", "_rank", "_quota"), cand


def top_guidance(train: pl.DataFrame, plan: AssignPlan) -> pl.DataFrame:
    """Per stratum, the training tiles of lowest (_h, key), at most the stratum's guidance quota."""
    ranked = train.sort("_h", "key").with_columns(_r=pl.int_range(1, pl.len() + 1).over("stratum"))
    return ranked.join(plan.guidance, on="stratum").filter(pl.col("_r") <= pl.col("_q")).select("key", "stratum", "_h")


def assign_splits(slides: pl.DataFrame, tiles: pl.DataFrame, curation: pl.DataFrame | None, cfg: SplitConfig) -> pl.DataFrame:
    """splits table (key, slide_id, patient, tss, split (train/val_in/val_out), guidance) of an
    in-memory run, sorted by key; ``run_split`` does the same slide chunk by slide chunk."""
    kept = kept_tiles(tiles.lazy(), curation.lazy() if curation is not None else None, cfg, tiles.columns)
    plan = assign_plan(slides, kept, cfg)
    t, cand = assign_chunk(kept.collect(), plan, cfg)
    t = t.with_columns(guidance=pl.col("key").is_in(cand["key"].implode()))
    return t.select(list(SPLITS_SCHEMA)).cast(SPLITS_SCHEMA).sort("key")


#: tiles.parquet columns the split reads (the rest of the table is never loaded)
SPLIT_COLUMNS = ["key", "slide_id", "patient", "tss", "shard", "x", "y", "level_x", "level_y", "region", "downsample"]


#: tiles assigned at a time (whole slides): bounds the split's memory
CHUNK_TILES = 500_000


def read_tiles(path: Path, cfg: SplitConfig) -> pl.DataFrame:
    """The columns of tiles.parquet the split needs (QC columns only for the thresholds set)."""
    return _scan_tiles(path, cfg).collect()


def _scan_tiles(path: Path, cfg: SplitConfig) -> pl.LazyFrame:
    names = pl.read_parquet_schema(path)
    qc = [col for name, (col, _) in QC_FILTERS.items() if getattr(cfg, name) is not None and col in names]
    return pl.scan_parquet(path).select([c for c in SPLIT_COLUMNS + qc if c in names])


def slide_chunks(tiles: pl.LazyFrame, max_tiles: int) -> list:
    """Functions that cut tiles.parquet into chunks of whole slides of about ``max_tiles`` rows: row
    slices when each slide's rows are contiguous (a tile run's table is), else filters by slide."""
    per = (tiles.with_row_index("_i").group_by("slide_id")
           .agg(first=pl.col("_i").min(), last=pl.col("_i").max(), n=pl.len()).sort("first").collect())
    contiguous = bool((per["last"] - per["first"] + 1 == per["n"]).all())
    chunks, start, rows, ids = [], 0, 0, []
    for sid, n in per.select("slide_id", "n").iter_rows():
        ids.append(sid)
        rows += n
        if rows >= max_tiles:
            chunks.append((start, rows, ids))
            start, rows, ids = start + rows, 0, []
    if ids:
        chunks.append((start, rows, ids))
    if contiguous:
        return [lambda lf, a=a, n=n: lf.slice(a, n) for a, n, _ in chunks]
    return [lambda lf, i=i: lf.filter(pl.col("slide_id").is_in(i)) for _, _, i in chunks]


@dataclass
class Assigned:
    """The assignment of a run, chunk by chunk: tables ``parts`` (the kept tiles of whole slides with
    their split, shard, x, y), the guidance keys and the val_in keys found overlapping train."""

    parts: list[Path]
    guidance: pl.Series
    overlaps: list[str]
    n_tiles: int
    n_qc_kept: int


def assign_run(run: Path, work: Path, cfg: SplitConfig, cur_path: Path | None) -> Assigned:
    """Assign every tile of the run, ``CHUNK_TILES`` tiles of whole slides at a time, into
    ``work/part-*.parquet``: memory is one chunk and the per-slide plan, never the run's table."""
    slides = pl.read_parquet(run / "slides.parquet")
    tiles = _scan_tiles(run / "tiles.parquet", cfg)
    cur = pl.scan_parquet(cur_path).select("key", "keep") if cur_path is not None else None
    names = list(pl.read_parquet_schema(run / "tiles.parquet"))
    plan = assign_plan(slides, kept_tiles(tiles, cur, cfg, names), cfg)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    parts, guidance, overlaps = [], pl.DataFrame(schema={"key": pl.String, "stratum": pl.String, "_h": pl.UInt64}), []
    drop = ("level_x", "level_y", "region", "downsample", *(c for _, (c, _) in QC_FILTERS.items()))
    for i, rows in enumerate(tqdm(slide_chunks(tiles, CHUNK_TILES), desc="split: assign", unit="chunk")):
        t, cand = assign_chunk(kept_tiles(rows(tiles), cur, cfg, names).collect(), plan, cfg)
        overlaps += overlapping(t.filter(pl.col("split") == "val_in"), t.filter(pl.col("split") == "train"))["key"].to_list()
        guidance = top_guidance(pl.concat([guidance, cand]), plan)
        parts.append(work / f"part-{i:05d}.parquet")
        t.drop(*[c for c in drop if c in t.columns]).write_parquet(parts[-1])
    return Assigned(parts, guidance["key"], overlaps, tiles.select(pl.len()).collect().item(),
                    kept_tiles(tiles, None, cfg, names).select(pl.len()).collect().item())
