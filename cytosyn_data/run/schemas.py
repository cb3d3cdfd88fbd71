"""Every table schema of a run folder in one place (DESIGN.md "Files of a run"), and the helpers that
read a column set the same way in every stage and report.

slides.parquet (:data:`SLIDES_SCHEMA`), candidates.parquet (:data:`CANDIDATE_SCHEMA`), tiles.parquet
(:data:`TILES_SCHEMA`, with the QC columns of :data:`QC_SCHEMA`), the read windows of a tile
(:data:`WINDOW_COLUMNS`, :func:`read_windows`), the stratum of a missing TSS (:data:`NULL_STRATUM`),
the side of each slide's report picture (:data:`VIEW_SIDE`).
"""

from __future__ import annotations

import polars as pl

from cytosyn_data.core.quotas import NULL_STRATUM

__all__ = ["CANDIDATE_SCHEMA", "NULL_STRATUM", "QC_SCHEMA", "SLIDES_SCHEMA", "TILES_SCHEMA", "VIEW_SIDE",
           "SPLITS_SCHEMA", "WINDOW_COLUMNS", "WRITTEN_SCHEMA", "read_windows"]


#: long side (pixels) of the picture of each slide kept for the HTML report (``{slide_id}.view.jpg``)
VIEW_SIDE = 1024

SLIDES_SCHEMA = {
    "slide_id": pl.String,
    "path": pl.String,
    "backend": pl.String,
    "vendor": pl.String,
    "width": pl.Int64,
    "height": pl.Int64,
    "levels": pl.Int32,
    "mpp": pl.Float64,
    "mpp_source": pl.String,
    "tss": pl.String,
    "project": pl.String,
    "patient": pl.String,
    "sample_type": pl.String,
    "slide_type": pl.String,
    "read_level": pl.Int32,
    "native": pl.Boolean,
    "footprint": pl.Float64,
    "status": pl.String,
    "error": pl.String,
    "n_candidates": pl.Int64,
    "n_selected": pl.Int64,
    "tissue_area_fraction": pl.Float64,  # of the slide's area under the tissue mask
    "qc_warning": pl.String,  # null, or why the tissue mask looks wrong (see records.tissue_warning)
}

CANDIDATE_SCHEMA = {
    "key": pl.String,
    "slide_id": pl.String,
    "col": pl.Int32,
    "row": pl.Int32,
    "x": pl.Int64,
    "y": pl.Int64,
    "tissue_fraction": pl.Float32,
}

QC_SCHEMA = {
    "qc_tissue": pl.Float32,
    "qc_blur": pl.Float32,
    "qc_saturation": pl.Float32,
    "qc_brightness": pl.Float32,
    "qc_pen": pl.Float32,
}

#: tiles.parquet; ``level_x, level_y, region`` is the read window in pixels of ``read_level``
#: (level-0 window starts at level_x * downsample); QC columns: :data:`QC_SCHEMA`.
TILES_SCHEMA = {
    "key": pl.String,
    "slide_id": pl.String,
    "tss": pl.String,
    "project": pl.String,
    "patient": pl.String,
    "slide_type": pl.String,
    "x": pl.Int64,
    "y": pl.Int64,
    "footprint": pl.Float64,
    "level_x": pl.Int64,
    "level_y": pl.Int64,
    "region": pl.Int32,
    "downsample": pl.Float64,
    "mpp": pl.Float64,
    "read_level": pl.Int32,
    "resample": pl.String,
    "tissue_fraction": pl.Float32,
    "shard": pl.String,
    "sha256": pl.String,
    **QC_SCHEMA,
}
#: what a worker computes per tile (the rest of a tiles.parquet row is known from the plan)
WRITTEN_SCHEMA = {"key": pl.String, "sha256": pl.String, **QC_SCHEMA}

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

#: splits.parquet: one row per kept tile, its split and guidance flag
SPLITS_SCHEMA = {"key": pl.String, "slide_id": pl.String, "patient": pl.String, "tss": pl.String,
                 "split": pl.String, "guidance": pl.Boolean}
