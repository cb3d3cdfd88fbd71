"""``cytosyn-data export-h5``: the written tiles' coordinates for TRIDENT or CLAM, in their layouts.

``--format trident`` (default): ``OUT/patches/{name}_patches.h5``; TRIDENT's
``Processor.run_feature_extraction_job(coords_dir=OUT)`` (or ``WSI.extract_features``) then reads
exactly our tiles. ``--format clam``: ``OUT/patches/{name}.h5`` for CLAM's
``extract_features_fp.py --data_h5_dir OUT``. ``name`` is the slide file's name without its
extension, as both tools name slides. OUT defaults to ``RUN/h5/{format}``. See
:mod:`cytosyn_data.io.coords_h5` for what each file says and why one file cannot serve both.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cytosyn_data.core.errors import DataError
from cytosyn_data.io.coords_h5 import slide_name, write_clam, write_trident
from cytosyn_data.run.paths import DetectFiles
from cytosyn_data.run.records import load_facts

__all__ = ["FORMATS", "export_h5"]

FORMATS = ("trident", "clam")


def export_h5(run: str | Path, fmt: str = "trident", out: str | Path | None = None,
              max_tiles: int = 1_000_000) -> list[Path]:
    """Write one coordinates file per slide with written tiles (tiles.parquet order), reading
    tiles.parquet for batches of slides of about ``max_tiles`` tiles; returns the paths."""
    run = Path(run)
    if fmt not in FORMATS:
        raise DataError(f"unknown coordinates format {fmt!r}; known: {', '.join(FORMATS)}")
    for need in ("slides.parquet", "tiles.parquet"):
        if not (run / need).exists():
            raise DataError(f"{run / need}: not found; is {run} a finished tile run?")
    folder = Path(out) if out is not None else run / "h5" / fmt
    slides = {r["slide_id"]: r for r in pl.read_parquet(run / "slides.parquet").iter_rows(named=True)}
    names = {sid: slide_name(r["path"]) for sid, r in slides.items()}
    twins = {n for n in names.values() if list(names.values()).count(n) > 1}
    if twins:
        raise DataError(f"{run / 'slides.parquet'}: several slides share the file name {sorted(twins)[0]!r}; "
                        "TRIDENT and CLAM name files by it: export them from separate runs")
    written = []
    for batch in _slide_batches(slides, max_tiles):
        parts = (pl.scan_parquet(run / "tiles.parquet").filter(pl.col("slide_id").is_in(batch))
                 .select(EXPORT_COLUMNS).collect().partition_by("slide_id", as_dict=True, maintain_order=True))
        for sid in batch:
            if (sid,) in parts:
                written.append(_export_slide(run, folder, fmt, slides[sid], names[sid], parts[(sid,)]))
    return written


#: the tiles.parquet columns an export reads
EXPORT_COLUMNS = ["key", "slide_id", "x", "y", "footprint", "mpp", "read_level", "region"]


def _slide_batches(slides: dict, max_tiles: int) -> list[list[str]]:
    """slide_ids in batches of about ``max_tiles`` written tiles: tiles.parquet is scanned once per
    batch, and memory holds one batch, never the run's table."""
    batches, batch, n = [], [], 0
    for sid, row in slides.items():
        batch.append(sid)
        n += int(row.get("n_selected") or 0)
        if n >= max_tiles:
            batches.append(batch)
            batch, n = [], 0
    return batches + ([batch] if batch else [])


def _export_slide(run: Path, folder: Path, fmt: str, slide: dict, name: str, part: pl.DataFrame) -> Path:
    xy, keys, row = part.select("x", "y").to_numpy(), part["key"].to_list(), part.row(0, named=True)
    if fmt == "trident":
        return write_trident(folder, name, xy, keys, tile_size=int(round(row["footprint"] * slide["mpp"] / row["mpp"])),
                             footprint=float(row["footprint"]), mpp=float(slide["mpp"]), target_mpp=float(row["mpp"]),
                             level0_size=(slide["width"], slide["height"]))
    facts = load_facts(DetectFiles.of_run(run, slide["slide_id"]).facts)
    level = int(row["read_level"])
    return write_clam(folder, name, xy, keys, patch_level=level, region=int(row["region"]),
                      level_downsample=float(facts.level_downsamples[level]),
                      level_dim=tuple(facts.level_dimensions[level]))
