"""`cytosyn-data split`: train / val_in / val_out, a guidance subset, split shards, leakage audit.

- val_out: whole patients held out (a patient's slides never straddle the sides): about
  ``val_out_fraction`` of the patients of each project (at least one per project that has two
  or more), picked round-robin over TSS strata in a seeded hash order.
- val_in: tiles of training slides held out of training (``val_in_fraction`` per slide), checked
  geometrically (level-0 squares) never to overlap a training tile.
- guidance: a TSS-stratified subset of the training tiles (they stay in train; ``guidance`` flag).
- Tiles removed by curation (``curation.parquet`` keep == false), and tiles outside the per-tile QC
  thresholds (``min_blur``, ``max_pen``, ``min_qc_tissue`` on tiles.parquet's QC columns), are left
  out of every split.
Shards per split under ``splits/{split}/`` are a pure re-sharding of the tile shards (bytes
copied, members in a keyed-hash global shuffle, fixed tar metadata): byte-reproducible.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from .errors import DataError
from .executors import ClusterSpec, open_executor
from .report import markdown_table
from .run_state import RunLock, check_run_file, file_identity
from .key_hash import key_hash
from .sampling import NULL_STRATUM, apportion, stable_hash
from .shards import atomic_write_bytes, write_parquet_atomic

SPLITS_SCHEMA = {"key": pl.String, "slide_id": pl.String, "patient": pl.String, "tss": pl.String,
                 "split": pl.String, "guidance": pl.Boolean}


@dataclass(frozen=True)
class SplitConfig:
    val_out_fraction: float = 0.1
    val_in_fraction: float = 0.02
    guidance_tiles: int = 1000
    seed: int = 0
    shard_size: int = 10_000
    jpeg_quality: int | None = None  # also write JPEG copies of every split (ablation), e.g. 70
    expand_px: int = 0  # also write tiles expanded by this many px per side (16 -> 256x256), re-read from the slides
    min_blur: float | None = None  # tiles with qc_blur below this (variance of the Laplacian) are left out
    max_pen: float | None = None  # tiles with qc_pen above this (pen-ink pixel fraction) are left out
    min_qc_tissue: float | None = None  # tiles with qc_tissue below this (tissue pixel fraction) are left out


#: SplitConfig field -> (tiles.parquet QC column, keep rule); see tile_kernel for the measures
QC_FILTERS = {"min_blur": ("qc_blur", ">="), "max_pen": ("qc_pen", "<="), "min_qc_tissue": ("qc_tissue", ">=")}


def qc_keep(tiles: pl.DataFrame, cfg: SplitConfig, where: str = "tiles.parquet") -> pl.Expr:
    """The rows kept by the per-tile QC thresholds of ``cfg`` (all rows when none is set)."""
    keep = pl.lit(True)
    for name, (col, rule) in QC_FILTERS.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if col not in tiles.columns:
            raise DataError(f"{where}: no {col} column (a tile run made before per-tile QC): re-tile, or drop "
                            f"--{name.replace('_', '-')}")
        keep = keep & (pl.col(col) >= value if rule == ">=" else pl.col(col) <= value)
    return keep


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
WINDOW_COLUMNS = ["key", "slide_id", "level_x", "level_y", "region", "downsample"]


def read_windows(df: pl.DataFrame) -> pl.LazyFrame:
    """Level-0 squares actually read, [x0, x1) x [y0, y1): level pixels [level_x, level_x + region)
    of the read level times its downsample (not the rounded key coordinates)."""
    ds = pl.col("downsample")
    return df.lazy().select(
        "key", "slide_id",
        x0=pl.col("level_x") * ds, y0=pl.col("level_y") * ds,
        x1=(pl.col("level_x") + pl.col("region")) * ds, y1=(pl.col("level_y") + pl.col("region")) * ds,
    )


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
    """slide_id -> number of val_in tiles: ``round(val_in_fraction x training tiles)`` apportioned over
    the training slides in proportion to their tiles (largest remainder, ties by seeded hash)."""
    n = train.group_by("slide_id").len().sort("slide_id")
    if n.height == 0:
        return pl.DataFrame(schema={"slide_id": pl.String, "_quota": pl.Int64})
    counts = n["len"].to_numpy().astype(np.int64)
    total = int(math.floor(cfg.val_in_fraction * counts.sum() + 0.5))
    ties = np.array([stable_hash(f"{cfg.seed}/val_in_slide/{s}") for s in n["slide_id"]], dtype=np.uint64)
    return pl.DataFrame({"slide_id": n["slide_id"], "_quota": apportion(total, counts.astype(float), counts, ties)})


def assign_splits(slides: pl.DataFrame, tiles: pl.DataFrame, curation: pl.DataFrame | None, cfg: SplitConfig) -> pl.DataFrame:
    """splits table: key, slide_id, patient, tss, split (train/val_in/val_out), guidance."""
    t = tiles.with_columns(patient=pl.coalesce("patient", "slide_id")).filter(qc_keep(tiles, cfg))
    if curation is not None:
        removed = curation.filter(~pl.col("keep"))["key"]
        t = t.filter(~pl.col("key").is_in(removed.implode()))
    held = choose_val_out(slides, cfg.val_out_fraction, cfg.seed)
    t = t.with_columns(split=pl.when(pl.col("patient").is_in(list(held))).then(pl.lit("val_out")).otherwise(pl.lit("train")))
    # val_in: round(fraction x training tiles) in all, apportioned over the training slides by largest
    # remainder (small slides get theirs too); each slide gives its tiles of lowest seeded hash
    t = t.with_columns(_h=pl.Series(key_hash(t["key"], f"{cfg.seed}/val_in")))
    t = t.with_columns(_rank=pl.col("_h").rank("ordinal").over("slide_id"))
    t = t.join(val_in_quotas(t.filter(pl.col("split") == "train"), cfg), on="slide_id", how="left")
    is_in = (pl.col("split") == "train") & (pl.col("_rank") <= pl.col("_quota").fill_null(0))
    t = t.with_columns(split=pl.when(is_in).then(pl.lit("val_in")).otherwise(pl.col("split")))
    train = t.filter(pl.col("split") == "train")
    clash = overlapping(t.filter(pl.col("split") == "val_in"), train)
    t = t.with_columns(split=pl.when(pl.col("key").is_in(clash["key"].implode())).then(pl.lit("excluded")).otherwise(pl.col("split")))
    t = t.with_columns(guidance=pl.col("key").is_in(guidance_keys(t.filter(pl.col("split") == "train"), cfg).implode()))
    return t.filter(pl.col("split") != "excluded").select(list(SPLITS_SCHEMA)).cast(SPLITS_SCHEMA).sort("key")


def guidance_keys(train: pl.DataFrame, cfg: SplitConfig) -> pl.Series:
    """A TSS-stratified subset of the training tiles: ``guidance_tiles`` apportioned over the TSS
    strata by their share of tiles; each stratum gives its tiles of lowest ``_h`` (the val_in hash)."""
    train = train.with_columns(stratum=pl.col("tss").fill_null(NULL_STRATUM))
    counts = train.group_by("stratum").len().sort("stratum")
    quotas = apportion(cfg.guidance_tiles, counts["len"].to_numpy().astype(float), counts["len"].to_numpy(),
                       np.array([stable_hash(f"{cfg.seed}/g/{s}") for s in counts["stratum"]], dtype=np.uint64))
    q = pl.DataFrame({"stratum": counts["stratum"], "_q": quotas})
    ranked = train.sort("_h", "key").with_columns(_r=pl.int_range(1, pl.len() + 1).over("stratum"))
    return ranked.join(q, on="stratum").filter(pl.col("_r") <= pl.col("_q"))["key"]


def audit(splits: pl.DataFrame, tiles: pl.DataFrame) -> dict:
    """Leakage audit: patients/slides shared by train and val_out, train/val_in overlaps, sizes per TSS."""
    s = splits.join(tiles.select(WINDOW_COLUMNS).drop("slide_id"), on="key", how="left")
    train, vo, vi = (s.filter(pl.col("split") == n) for n in ("train", "val_out", "val_in"))
    shared_patients = sorted(set(train["patient"]) & set(vo["patient"]))
    shared_slides = sorted(set(train["slide_id"]) & set(vo["slide_id"]))
    overlaps = overlapping(vi, train)
    sizes = s.with_columns(pl.col("tss").fill_null(NULL_STRATUM)).group_by("tss", "split").len().sort("tss", "split")
    return {
        "shared_patients_train_val_out": shared_patients,
        "shared_slides_train_val_out": shared_slides,
        "overlapping_val_in_tiles": overlaps["key"].to_list(),
        "sizes": sizes,
        "guidance": int(s["guidance"].sum()),
        "ok": not shared_patients and not shared_slides and overlaps.height == 0,
    }


def write_audit(path: Path, result: dict) -> None:
    sizes = result["sizes"].pivot(on="split", index="tss", values="len").fill_null(0)
    lines = ["# split leakage audit", "",
             f"- shared patients train/val_out: {len(result['shared_patients_train_val_out'])}",
             f"- shared slides train/val_out: {len(result['shared_slides_train_val_out'])}",
             f"- val_in tiles whose read window overlaps a train tile's (level-0 squares actually read): "
             f"{len(result['overlapping_val_in_tiles'])}",
             f"- guidance tiles: {result['guidance']}",
             f"- verdict: {'OK, no leakage' if result['ok'] else 'LEAKAGE'}", "", "## tiles per TSS and split", "",
             markdown_table(sizes)]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def _split_inputs(run: Path, cur_path: Path | None) -> list[str]:
    """Identity (size, mtime) of every input of a split: the tile tables, the shards, the curation."""
    files = [run / "slides.parquet", run / "tiles.parquet", *sorted((run / "shards").glob("*.tar"))]
    if cur_path is not None:
        files.append(cur_path)
    out = []
    for f in files:
        ident = file_identity(f)
        out.append(f"{f.relative_to(run) if f.is_relative_to(run) else f} size={ident['size']} mtime_ns={ident['mtime_ns']}")
    return out


def clear_split_outputs(run: Path, out: Path) -> None:
    """Remove what a split wrote: the split shard folders, splits.parquet, audit, counts, run.json."""
    import shutil

    for d in out.iterdir() if out.exists() else []:
        if d.is_dir() and (d.name.split("_")[0] in ("train", "val", "guidance") or d.name == ".shuffle"):
            shutil.rmtree(d)
    for f in (out / "audit.md", out / "counts.json", out / "run.json", out / "splits.parquet", run / "splits.parquet"):
        f.unlink(missing_ok=True)


def run_split(tile_run: str | Path, out: str | Path | None = None, cfg: SplitConfig = SplitConfig(),
              curation: str | Path | None = None, overwrite: bool = False, cluster: ClusterSpec = ClusterSpec()) -> dict:
    """Assign splits for a tile run folder and write ``splits.parquet``, split shards and ``splits/audit.md``.

    ``curation``: a curation table (a missing file is an error); default ``RUN/curation.parquet``
    when it exists. ``out/run.json`` records the settings and the identity of every input: a
    re-run with other ones is refused unless ``overwrite`` clears the old split first. ``cluster``:
    where the shuffle's units run (local pool by default; the bytes do not depend on it)."""
    run = Path(tile_run)
    out = Path(out) if out else run / "splits"
    if curation is not None and not Path(curation).exists():
        raise DataError(f"{curation}: curation file not found (give an existing curation.parquet, or leave --curation out)")
    for need in ("slides.parquet", "tiles.parquet"):
        if not (run / need).exists():
            raise DataError(f"{run / need}: not found; is {run} a finished tile run?")
    cur_path = Path(curation) if curation else (run / "curation.parquet" if (run / "curation.parquet").exists() else None)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        check_run_file(out, "split", dataclasses.asdict(cfg), _split_inputs(run, cur_path), overwrite,
                       lambda: clear_split_outputs(run, out))
        return _run_split(run, out, cfg, cur_path, cluster)


#: tiles.parquet columns the split reads (the rest of the table is never loaded)
SPLIT_COLUMNS = ["key", "slide_id", "patient", "tss", "shard", "x", "y", "level_x", "level_y", "region", "downsample"]


def read_tiles(path: Path, cfg: SplitConfig) -> pl.DataFrame:
    """The columns of tiles.parquet the split needs (QC columns only for the thresholds set)."""
    names = pl.read_parquet_schema(path)
    qc = [col for name, (col, _) in QC_FILTERS.items() if getattr(cfg, name) is not None and col in names]
    return pl.read_parquet(path, columns=[c for c in SPLIT_COLUMNS + qc if c in names])


def _run_split(run: Path, out: Path, cfg: SplitConfig, cur_path: Path | None, cluster: ClusterSpec) -> dict:
    import time

    from .split_shuffle import shuffle_to_shards

    t0 = time.perf_counter()
    slides = pl.read_parquet(run / "slides.parquet")
    tiles = read_tiles(run / "tiles.parquet", cfg)
    cur = pl.read_parquet(cur_path, columns=["key", "keep"]) if cur_path is not None else None
    splits = assign_splits(slides, tiles, cur, cfg)
    n_qc = tiles.height - tiles.filter(qc_keep(tiles, cfg)).height
    write_parquet_atomic(splits, run / "splits.parquet" if out == run / "splits" else out / "splits.parquet")
    t1 = time.perf_counter()
    result = audit(splits, tiles)
    write_audit(out / "audit.md", result)
    t2 = time.perf_counter()
    with open_executor(cluster, warm=("cytosyn_data.split_shuffle",)) as ex:
        shuffled = shuffle_to_shards(splits, tiles, slides, sorted((run / "shards").glob("*.tar")), out, cfg, ex,
                                     max(cluster.workers, cluster.jobs * cluster.cores if cluster.kind == "slurm" else 1))
    atomic_write_bytes(out / "counts.json", json.dumps(shuffled["counts"], indent=1, sort_keys=True).encode())
    result.update(counts=shuffled["counts"], removed_by_qc=n_qc, tiles=tiles.height,
                  seconds={"assign": t1 - t0, "audit": t2 - t1, **shuffled["seconds"]})
    if out == run / "splits":  # the run's page shows the splits
        from .html_report import write_report

        write_report(run)
    return result
