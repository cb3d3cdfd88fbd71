"""Build the slide table from files, a folder, or a CSV/parquet table.

Table columns: path (required), slide_id, mpp, project (optional). TCGA barcodes give
tss, patient, sample_type and slide_type; other names leave them null.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import polars as pl

from cytosyn_data.core.checks import safe_slide_id
from cytosyn_data.core.errors import DataError, UsageError
from cytosyn_data.core.secrets import redact_url
from cytosyn_data.io.remote import filesystem, is_url, list_remote, remote_is_dir
from cytosyn_data.run.barcode import parse_slide_name, slide_id_from_path

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
    "fetch_url": pl.String,  # the URL with its credentials, only to fetch (null when it has none); never written
}


class SlideTableError(DataError, ValueError):
    """The slide list or table is unusable (message names the file, the row and the cause)."""


def _read_table(path: Path | str) -> pl.DataFrame:
    """Rows of a CSV/parquet slide table (local or at a URL); relative paths are relative to it."""
    csv = str(path).lower().endswith(".csv")
    if is_url(path):
        fs, inner = filesystem(str(path))
        with fs.open(inner, "rb") as fh:
            data = fh.read()
        df = pl.read_csv(io.BytesIO(data), infer_schema_length=0) if csv else pl.read_parquet(io.BytesIO(data))
    else:
        df = pl.read_csv(path, infer_schema_length=0) if csv else pl.read_parquet(path)  # csv: all strings
    if "path" not in df.columns:
        raise SlideTableError(f"{path}: slide table has no 'path' column (columns: {df.columns})")
    rows = []
    for i, r in enumerate(df.iter_rows(named=True), start=2 if csv else 0):
        where = f"{path}, {'line' if csv else 'row'} {i}"
        if r["path"] in (None, ""):
            raise SlideTableError(f"{where}: empty path")
        rows.append(
            {
                "path": _relative_to_table(str(r["path"]), path),
                "slide_id": r.get("slide_id") or None,
                "mpp": _table_mpp(r.get("mpp"), where),
                "project": r.get("project") or None,
                "where": where,
            }
        )
    return rows


def _default_id(path: str) -> str:
    """slide_id from a path: the file stem, or a DICOM series folder's whole name ('.' -> '-')."""
    if not is_url(path) and Path(path).is_dir():
        return Path(path).name.replace(".", "-")
    return slide_id_from_path(path.split("?")[0])


def find_slides(folder: Path) -> list[Path]:
    """Slide files under ``folder`` (recursive), sorted; every folder of ``.dcm`` files is one slide
    (a DICOM WSI series: its levels, label and overview are separate instances)."""
    found, series = [], set()
    for q in folder.rglob("*"):
        if not q.is_file():
            continue
        if q.suffix.lower() == ".dcm":
            series.add(q.parent)
        elif q.suffix.lower() in SLIDE_EXTENSIONS:
            found.append(q)
    return sorted(found + list(series))


def _relative_to_table(value: str, table: Path | str) -> str:
    if is_url(value) or Path(value).is_absolute():
        return value
    if is_url(table):
        return str(table).rsplit("/", 1)[0] + "/" + value
    return str(Path(table).parent / value)


def _table_mpp(value, where: str) -> float | None:
    """The ``mpp`` cell: empty, or a finite number > 0 (microns per level-0 pixel)."""
    if value in (None, ""):
        return None
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
        if is_url(item):
            rows.extend(_remote_rows(str(item)))
        elif p.suffix.lower() in {".csv", ".parquet"}:
            if not p.exists():
                raise SlideTableError(f"{p}: slide table not found")
            rows.extend(_read_table(p))
        elif p.is_dir():
            found = find_slides(p)
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
            sid = safe_slide_id(r["slide_id"] or _default_id(r["path"]), r.get("where", r["path"]))
        except UsageError as exc:
            raise SlideTableError(str(exc)) from None
        name = parse_slide_name(sid if r["slide_id"] else _default_id(r["path"]))
        out.append(
            {
                "slide_id": sid,
                "path": redact_url(r["path"]) if is_url(r["path"]) else str(Path(r["path"]).resolve()),
                "fetch_url": r["path"] if is_url(r["path"]) and redact_url(r["path"]) != r["path"] else None,
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


def _remote_rows(url: str) -> list[dict]:
    """A slide table, a folder-like prefix, or one slide at an fsspec URL."""
    if url.lower().endswith((".csv", ".parquet")):
        return _read_table(url)
    if remote_is_dir(url):
        found = list_remote(url, SLIDE_EXTENSIONS)
        if not found:
            raise SlideTableError(f"{url}: no slide files ({', '.join(sorted(SLIDE_EXTENSIONS))}) under this prefix")
        return [{"path": u, "slide_id": None, "mpp": None, "project": None} for u in found]
    return [{"path": url, "slide_id": None, "mpp": None, "project": None}]
