"""The split's leakage audit: no patient or slide on both sides of train / val_out, no val_in read
window overlapping a train tile's (level-0 squares); ``audit.md``."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cytosyn_data.core.quotas import NULL_STRATUM
from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.reports.markdown import markdown_table
from cytosyn_data.run.schemas import WINDOW_COLUMNS
from cytosyn_data.split.assign import overlapping


def audit(splits: pl.DataFrame, tiles: pl.DataFrame) -> dict:
    """Leakage audit of an in-memory split (see :func:`audit_parts`), the overlap check included."""
    s = splits.join(tiles.select(WINDOW_COLUMNS).drop("slide_id"), on="key", how="left")
    overlaps = overlapping(s.filter(pl.col("split") == "val_in"), s.filter(pl.col("split") == "train"))
    return audit_parts(splits.lazy(), overlaps["key"].to_list())


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


def audit_parts(splits: pl.LazyFrame, overlapping_keys: list[str]) -> dict:
    """The leakage audit of a split streamed from its table (aggregations only; the overlap check of
    val_in against train ran per chunk of whole slides: ``overlapping_keys``)."""
    def shared(col: str) -> list[str]:
        both = splits.group_by(col).agg(t=(pl.col("split") == "train").any(), v=(pl.col("split") == "val_out").any())
        return both.filter(pl.col("t") & pl.col("v")).select(col).collect()[col].sort().to_list()

    sp, ss = shared("patient"), shared("slide_id")
    sizes = (splits.with_columns(pl.col("tss").fill_null(NULL_STRATUM)).group_by("tss", "split").len()
             .sort("tss", "split").collect())
    return {"shared_patients_train_val_out": sp, "shared_slides_train_val_out": ss,
            "overlapping_val_in_tiles": sorted(overlapping_keys), "sizes": sizes,
            "guidance": int(splits.select(pl.col("guidance").sum()).collect().item()),
            "ok": not sp and not ss and not overlapping_keys}
