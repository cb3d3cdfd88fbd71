"""`cytosyn-data merge`: the part tables of a run split over independent jobs
(``--shard-index/--num-shards``) joined into the run's tables."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from cytosyn_data.io.atomic import tmp_path, write_parquet_atomic


def merge_parts(out: str | Path) -> dict[str, int]:
    """Join the ``*-partXXXXofYYYY.parquet`` tables of a split run into the unified tables.

    Checks that every part is present and that no slide is in two parts (tile keys start with
    their slide id, so no key can then appear twice). The candidate and tile tables are streamed
    part after part into the merged file (polars ``sink_parquet``): memory does not grow with them.
    """
    out = Path(out)
    files = {}
    for table in ("slides", "candidates", "tiles"):
        files[table] = sorted(out.glob(f"{table}-part*of*.parquet"))
        if not files[table]:
            raise RuntimeError(f"{out}: no {table}-part*.parquet files to merge")
        total = int(files[table][0].stem.split("of")[-1])
        if len(files[table]) != total:
            raise RuntimeError(f"{out}: {len(files[table])} of {total} parts of {table} present")
    slides = pl.concat([pl.read_parquet(f) for f in files["slides"]], how="vertical")
    dup = slides.filter(pl.col("slide_id").is_duplicated())
    if dup.height:
        raise RuntimeError(f"{out}: slides in two parts, e.g. {dup['slide_id'].unique().sort()[:3].to_list()}")
    write_parquet_atomic(slides.sort("slide_id"), out / "slides.parquet")
    counts = {"slides": slides.height}
    for table in ("candidates", "tiles"):
        tmp = tmp_path(out / f"{table}.parquet")
        pl.scan_parquet(files[table]).sink_parquet(tmp, statistics=False)
        os.replace(tmp, out / f"{table}.parquet")
        counts[table] = pl.scan_parquet(out / f"{table}.parquet").select(pl.len()).collect().item()
    return counts
