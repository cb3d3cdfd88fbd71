"""Build the slide table from files, a folder, or a CSV/parquet table.

Table columns: path (required), slide_id, mpp, project (optional). TCGA barcodes give
tss, patient, sample_type and slide_type; other names leave them null.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .barcode import parse_slide_name, slide_id_from_path
from .checks import safe_slide_id
from .errors import DataError, UsageError

SLIDE_EXTENSIONS = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".dcm"}

SLIDE_TABLE_SCHEMA = {
    "slide_id": pl.String,
    "path": pl.String,
    "mpp_override": pl.Float64,
    "project": pl.String,
    "tss": pl.String,
    "patient": pl.String,
    "sample_type": pl.String,
    "slide_type": pl.String,
}


class SlideTableError(DataError, ValueError):
    """The slide list or table is unusable (message names the file, the row and the cause)."""


def _read_table(path: Path) -> pl.DataFrame:
    if path.suffix.lower() == ".csv":
        df = pl.read_csv(path, infer_schema_length=0)  # all strings; cast below
    else:
        df = pl.read_parquet(path)
    if "path" not in df.columns:
        raise SlideTableError(f"{path}: slide table has no 'path' column (columns: {df.columns})")
    base = path.parent
    rows = []
    for i, r in enumerate(df.iter_rows(named=True), start=2 if path.suffix.lower() == ".csv" else 0):
        where = f"{path}, {'line' if path.suffix.lower() == '.csv' else 'row'} {i}"
        if r["path"] in (None, ""):
            raise SlideTableError(f"{where}: empty path")
        p = Path(str(r["path"]))
        rows.append(
            {
                "path": str(p if p.is_absolute() else (base / p)),
                "slide_id": r.get("slide_id") or None,
                "mpp": _table_mpp(r.get("mpp"), where),
                "project": r.get("project") or None,
                "where": where,
            }
        )
    return rows


def _table_mpp(value, where: str) -> float | None:
    """The ``mpp`` cell: empty, or a finite number > 0 (microns per level-0 pixel)."""
    if value in (None, ""):
        return None
    import math

    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise SlideTableError(f"{where}: mpp {value!r} is not a number") from None
    if not math.isfinite(mpp) or mpp <= 0:
        raise SlideTableError(f"{where}: mpp {value!r} must be a finite number > 0")
    return mpp


def build_slide_table(inputs: list[str | Path], mpp_override: float | None = None) -> pl.DataFrame:
    """One row per slide, sorted by slide_id; duplicate slide_ids are an error.

    ``inputs``: slide files, folders (searched recursively for slide extensions) or one
    .csv/.parquet table. ``mpp_override`` applies to every slide (DESIGN.md's user override).
    """
    rows: list[dict] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() in {".csv", ".parquet"}:
            if not p.exists():
                raise SlideTableError(f"{p}: slide table not found")
            rows.extend(_read_table(p))
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in SLIDE_EXTENSIONS and q.is_file())
            rows.extend({"path": str(q), "slide_id": None, "mpp": None, "project": None} for q in found)
            if not found:
                raise SlideTableError(f"{p}: no slide files ({', '.join(sorted(SLIDE_EXTENSIONS))}) in this folder")
        else:
            rows.append({"path": str(p), "slide_id": None, "mpp": None, "project": None})
    if not rows:
        raise SlideTableError(f"no slides found in {[str(i) for i in inputs]}")
    out = []
    for r in rows:
        try:
            sid = safe_slide_id(r["slide_id"] or slide_id_from_path(r["path"]), r.get("where", r["path"]))
        except UsageError as exc:
            raise SlideTableError(str(exc)) from None
        name = parse_slide_name(sid if r["slide_id"] else Path(r["path"]).stem)
        out.append(
            {
                "slide_id": sid,
                "path": str(Path(r["path"]).resolve()),
                "mpp_override": mpp_override if mpp_override is not None else r["mpp"],
                "project": r["project"],
                "tss": name.tss,
                "patient": name.patient,
                "sample_type": name.sample_type,
                "slide_type": name.slide_type,
            }
        )
    df = pl.DataFrame(out, schema=SLIDE_TABLE_SCHEMA).sort("slide_id")
    dup = df.filter(pl.col("slide_id").is_duplicated())["slide_id"].unique().to_list()
    if dup:
        raise SlideTableError(f"duplicate slide_id(s) {dup[:5]}: give a slide_id column to tell them apart")
    return df
