"""Markdown summaries of stage runs (``report.md``)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.run.schemas import NULL_STRATUM


def markdown_table(df: pl.DataFrame, float_fmt: str | None = None) -> str:
    """A markdown table of ``df`` (nulls empty; floats through ``float_fmt`` when given)."""

    def cell(v) -> str:
        if v is None:
            return ""
        if float_fmt and isinstance(v, float):
            return float_fmt.format(v)
        return str(v)

    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.iter_rows():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def write_tile_report(path: Path, result, slides: pl.DataFrame, cfg) -> str:
    """Write the tile stage's report: slides ok/failed, candidates, selection per TSS, speed."""
    work_s = result.seconds.get("write", 0.0)
    rate = result.n_tiles / work_s if work_s > 0 else float("nan")
    ok = slides.filter(pl.col("status") == "ok").height
    per_tss = (
        slides.with_columns(pl.col("tss").fill_null(NULL_STRATUM))
        .group_by("tss")
        .agg(
            slides=pl.len(),
            ok=(pl.col("status") == "ok").sum(),
            candidates=pl.col("n_candidates").sum(),
            selected=pl.col("n_selected").sum(),
        )
        .sort("tss")
    )
    quotas = pl.DataFrame(
        {"stratum": list(result.stratum_quotas), "quota": list(result.stratum_quotas.values())},
        schema={"stratum": pl.String, "quota": pl.Int64},
    )
    failed = slides.filter(pl.col("status") != "ok").select("slide_id", "error")
    warned = (slides.filter(pl.col("qc_warning").is_not_null()).select("slide_id", "qc_warning")
              if "qc_warning" in slides.columns else pl.DataFrame())
    text = f"""# cytosyn-data tile report

- slides: {slides.height} ({ok} ok, {slides.height - ok} failed)
- candidates (tissue fraction >= {cfg.tissue_threshold}): {result.n_candidates}
- tiles written: {result.n_tiles} in {result.n_shards} shard(s); budget: {cfg.tiles if cfg.tiles is not None else 'all'}; seed {cfg.seed}
- target: {cfg.tile_size} px at {cfg.target_mpp} MPP; PNG encoder {cfg.png_encoder}; resample {cfg.resample}
- time: detect {result.seconds.get('detect', 0):.2f} s, write shards {result.seconds.get('write', 0):.2f} s
- throughput (write phase): {rate:.1f} tiles/s on {result.backend}

## Selection per TSS

{markdown_table(per_tss)}

## Stratum quotas (global, all jobs)

{markdown_table(quotas)}

## Failed slides

{markdown_table(failed) if failed.height else 'none'}

## Tissue-mask warnings

{markdown_table(warned) if warned.height else 'none'}
"""
    atomic_write_bytes(path, text.encode())
    return text
