"""What a person looks at to label and to check curation: contact sheets with keys, the removed
fraction per TSS and slide type, and weak labels from pixel checks (pen ink, background, blur)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import polars as pl

from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.io.png import decode_png, encode_png
from cytosyn_data.io.tar_read import split_member, stream_members
from cytosyn_data.run.barcode import parse_slide_name
from cytosyn_data.run.schemas import NULL_STRATUM
from cytosyn_data.wsi.tissue import pen_mask


def contact_sheet(pngs: list[bytes], labels: list[str], path: Path, cols: int = 8, thumb: int = 160) -> Path:
    """A grid of tiles with their labels (keys, scores) printed under each, as PNG."""
    rows = max(1, -(-len(pngs) // cols))
    cell_h = thumb + 28
    sheet = np.full((rows * cell_h, cols * thumb, 3), 255, np.uint8)
    for i, (png, text) in enumerate(zip(pngs, labels)):
        r, c = divmod(i, cols)
        img = cv2.resize(decode_png(png), (thumb, thumb), interpolation=cv2.INTER_AREA)
        sheet[r * cell_h : r * cell_h + thumb, c * thumb : (c + 1) * thumb] = img
        for j, line in enumerate([text[k : k + 26] for k in range(0, min(len(text), 52), 26)]):
            cv2.putText(sheet, line, (c * thumb + 2, r * cell_h + thumb + 11 + 12 * j), cv2.FONT_HERSHEY_SIMPLEX,
                        0.32, (0, 0, 0), 1, cv2.LINE_AA)
    atomic_write_bytes(path, encode_png(sheet), durable=False)
    return path


def pngs_for(shard_dir: Path, keys: list[str], tiles: pl.DataFrame | None = None) -> dict[str, bytes]:
    """PNG bytes of ``keys``: only the shards that hold them are read (tiles.parquet's ``shard``
    column; without it every shard, sequentially, until all are found)."""
    want, got = set(keys), {}
    shards = sorted(Path(shard_dir).glob("*.tar"))
    if tiles is not None and "shard" in tiles.columns:
        names = set(tiles.filter(pl.col("key").is_in(list(want)))["shard"].to_list())
        shards = [p for p in shards if p.name in names]
    for shard in shards:
        for name, data in stream_members(shard):
            key, ext = split_member(name)
            if ext == "png" and key in want:
                got[key] = data
        if len(got) == len(want):
            break
    return got


def removal_report(cur: pl.DataFrame | pl.LazyFrame, slides: pl.DataFrame | None = None) -> pl.DataFrame:
    """Removed fraction per TSS and slide type. A tile's slide is its key's prefix; TSS and slide type
    come from ``slides`` (slides.parquet) or else from the TCGA barcode of the slide id: a join on the
    slides, aggregated streaming (no per-tile table is built)."""
    lf = cur.lazy().with_columns(slide_id=pl.col("key").str.split("__").list.first())
    if slides is None or not {"tss", "slide_type"} <= set(slides.columns):
        sids = lf.select(pl.col("slide_id").unique()).collect()["slide_id"].to_list()
        names = [parse_slide_name(s) for s in sids]
        slides = pl.DataFrame({"slide_id": sids, "tss": [n.tss for n in names], "slide_type": [n.slide_type for n in names]},
                              schema={"slide_id": pl.String, "tss": pl.String, "slide_type": pl.String})
    lf = lf.join(slides.lazy().select("slide_id", "tss", "slide_type"), on="slide_id", how="left")
    return _removed_fractions(lf).collect()


def _removed_fractions(cur: pl.LazyFrame) -> pl.LazyFrame:
    return (
        cur.with_columns(pl.col("tss").fill_null(NULL_STRATUM), pl.col("slide_type").fill_null(NULL_STRATUM))
        .group_by("tss", "slide_type")
        .agg(tiles=pl.len(), removed=(~pl.col("keep")).sum(), removed_fraction=(~pl.col("keep")).mean())
        .sort("tss", "slide_type")
    )


def weak_label(rgb: np.ndarray, blur_threshold: float = 40.0) -> str:
    """Pixel-check label for bootstrapping annotations: pen, background, blur or usable.

    pen: > 15% ink pixels (tissue.pen_mask); background: < 30% saturated pixels; blur: variance of
    the Laplacian of the grey image below ``blur_threshold``. A starting point for a person to
    correct, not ground truth.
    """
    if pen_mask(rgb).mean() > 0.15:
        return "pen"
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    if (hsv[..., 1] > 25).mean() < 0.3:
        return "background"
    if cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var() < blur_threshold:
        return "blur"
    return "usable"
