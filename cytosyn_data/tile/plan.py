"""Planning of the tile stage: per-slide selection, and the shard plan cut into work units.

The plan lists every tile to write, in member order: slides in a keyed-hash order (seeded),
the tiles of a slide row-major (so the JPEG tiles of a row band are decoded once, while they are
in the reader's cache). The list is cut every ``shard_size`` tiles; each shard is one work unit,
written by one worker straight to its final name (a large slide is several units; several small
slides can share one). The global shuffle across slides is the split stage's job.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from cytosyn_data.core.quotas import NULL_STRATUM, allocate_quotas, select_tiles, shard_order
from cytosyn_data.run.records import SlideFacts, SlideRead
from cytosyn_data.run.schemas import TILES_SCHEMA, WRITTEN_SCHEMA
from cytosyn_data.wsi.slide import RESAMPLE_NAMES

PLAN_COLUMNS = [c for c in TILES_SCHEMA if c not in WRITTEN_SCHEMA or c == "key"]

@dataclass(frozen=True)
class ShardUnit:
    """One shard to write: its tiles as ``segments`` (slide_id, start, stop) of the slides' plan
    files ``select_dir/{slide_id}.plan.parquet`` (member order), and the slides they come from.
    The driver never holds the rows of the run: a worker loads its unit's rows (:meth:`load_rows`)."""

    name: str
    shard_dir: str
    plans_dir: str
    select_dir: str
    segments: tuple[tuple[str, int, int], ...]
    slides: dict[str, SlideRead]
    settings: dict = field(default_factory=dict)  # tile_size, target_mpp, resample, png_encoder
    digest: str = ""
    complete: bool = True  # False: rows of failed slides were cut; the digest is then not recorded

    @property
    def n_rows(self) -> int:
        return sum(b - a for _, a, b in self.segments)

    def load_rows(self) -> pl.DataFrame:
        """The plan rows of this shard (PLAN_COLUMNS, member order)."""
        parts = [pl.read_parquet(Path(self.select_dir) / f"{sid}.plan.parquet").slice(a, b - a)
                 for sid, a, b in self.segments]
        if not parts:
            return pl.DataFrame(schema={c: TILES_SCHEMA[c] for c in PLAN_COLUMNS})
        rows = pl.concat(parts, how="diagonal_relaxed").with_columns(shard=pl.lit(self.name))
        return rows.select(PLAN_COLUMNS).cast({c: TILES_SCHEMA[c] for c in PLAN_COLUMNS})


def slide_quotas(ok_rows: list[dict], facts: dict[str, SlideFacts], budget: int | None, seed: int) -> tuple[dict[str, int], dict]:
    """Per-slide quotas (global over all jobs) and per-stratum totals, stratified by TSS."""
    strata = [r["tss"] or NULL_STRATUM for r in ok_rows]
    n_cand = np.array([facts[r["slide_id"]].n_candidates for r in ok_rows], dtype=np.int64)
    quotas, totals = allocate_quotas(strata, n_cand, [r["slide_id"] for r in ok_rows], budget, seed)
    return {r["slide_id"]: int(q) for r, q in zip(ok_rows, quotas)}, totals


def select_candidates(cand: pl.DataFrame, slide_id: str, quota: int, seed: int) -> pl.DataFrame:
    """The candidates with a ``selected`` flag (``quota`` of them, drawn per slide)."""
    pick = select_tiles(slide_id, cand.height, quota, seed)
    return cand.with_columns(pl.Series("selected", np.isin(np.arange(cand.height), pick)))


def slide_plan_rows(cand: pl.DataFrame, slide: dict, facts: SlideFacts, target_mpp: float, resample: str) -> pl.DataFrame:
    """Plan rows of one slide's selected tiles, row-major, with the slide-level columns."""
    ds = float(facts.downsample)
    return (
        cand.filter(pl.col("selected"))
        .sort(["row", "col"])
        .select("key", "x", "y", "tissue_fraction")
        .with_columns(
            slide_id=pl.lit(slide["slide_id"]),
            tss=pl.lit(slide["tss"], pl.String),
            project=pl.lit(slide["project"], pl.String),
            patient=pl.lit(slide["patient"], pl.String),
            slide_type=pl.lit(slide["slide_type"], pl.String),
            footprint=pl.lit(float(facts.footprint)),
            level_x=((pl.col("x") / ds) + 0.5).floor().cast(pl.Int64),
            level_y=((pl.col("y") / ds) + 0.5).floor().cast(pl.Int64),
            region=pl.lit(int(facts.region), pl.Int32),
            downsample=pl.lit(ds),
            mpp=pl.lit(target_mpp),
            read_level=pl.lit(int(facts.read_level), pl.Int32),
            resample=pl.lit("native" if facts.native else RESAMPLE_NAMES[resample]),
        )
    )


def shard_cuts(counts: dict[str, int], seed: int, shard_size: int, prefix: str) -> list[tuple[str, tuple]]:
    """Slides in keyed order, their planned tiles cut every ``shard_size``: (shard name, segments
    (slide_id, start, stop)) per shard. Only the per-slide counts are needed, not the rows."""
    sids = [s for s in counts if counts[s]]
    cuts, seg, filled = [], [], 0
    for i in shard_order(sids, seed) if sids else []:
        sid, start = sids[i], 0
        while start < counts[sid]:
            take = min(shard_size - filled, counts[sid] - start)
            seg.append((sid, start, start + take))
            start, filled = start + take, filled + take
            if filled == shard_size:
                cuts.append(tuple(seg))
                seg, filled = [], 0
    if seg:
        cuts.append(tuple(seg))
    return [(f"{prefix}-{i:06d}.tar", segs) for i, segs in enumerate(cuts)]


def slide_digest(rows: pl.DataFrame) -> str:
    """sha256 of one slide's plan rows (what its tiles' bytes depend on, with the read facts)."""
    return hashlib.sha256(rows.write_ipc(None, compression="uncompressed").getvalue()).hexdigest()


def shard_units(cuts: list, facts: dict[str, SlideFacts], settings: dict, digests: dict[str, str], dirs: dict[str, Path]) -> list[ShardUnit]:
    """One :class:`ShardUnit` per cut, each with the digest of what makes its bytes. ``dirs``:
    shard_dir, plans_dir, select_dir."""
    units = []
    for name, segs in cuts:
        slides = {sid: facts[sid].read() for sid in dict.fromkeys(s for s, _, _ in segs)}
        ident = {sid: i.identity() for sid, i in slides.items()}  # not where it lies
        plan = [(sid, a, b, digests[sid]) for sid, a, b in segs]
        h = hashlib.sha256(json.dumps({"name": name, "settings": settings, "slides": ident, "plan": plan},
                                      sort_keys=True).encode())
        units.append(ShardUnit(name, str(dirs["shard_dir"]), str(dirs["plans_dir"]), str(dirs["select_dir"]),
                               tuple(segs), slides, settings, h.hexdigest()))
    return units
