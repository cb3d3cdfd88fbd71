"""The split stage's settings (:class:`SplitConfig`) and its per-tile QC thresholds (:func:`qc_keep`)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from cytosyn_data.core.errors import DataError


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


def qc_keep(tiles: pl.DataFrame | list[str], cfg: SplitConfig, where: str = "tiles.parquet") -> pl.Expr:
    """The rows kept by the per-tile QC thresholds of ``cfg`` (all rows when none is set); ``tiles``:
    the table or its column names (a threshold whose column is missing is an error naming ``where``)."""
    names = tiles if isinstance(tiles, list) else tiles.columns
    keep = pl.lit(True)
    for name, (col, rule) in QC_FILTERS.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if col not in names:
            raise DataError(f"{where}: no {col} column (a tile run made before per-tile QC): re-tile, or drop "
                            f"--{name.replace('_', '-')}")
        keep = keep & (pl.col(col) >= value if rule == ">=" else pl.col(col) <= value)
    return keep
