"""Phase 1 of the tile stage, one work unit per slide: open, resolve MPP, tissue mask, candidates.

Outputs (each written to a temporary name and renamed): ``work/detect/{slide_id}.json`` (slide
facts, status, error), ``.parquet`` (candidate tiles, level-0 pixels), ``.thumb.png`` and
``.mask.png`` (the tissue mask at ``tissue_mpp`` microns per pixel), ``.view.jpg`` (the slide at
least 1024 px on its long side, for the HTML report).
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import polars as pl

from cytosyn_data.core.errors import DataError
from cytosyn_data.core.executors import rank_device
from cytosyn_data.core.secrets import redact_text
from cytosyn_data.io.atomic import atomic_write_bytes, write_parquet_atomic
from cytosyn_data.io.coords_h5 import read_coords
from cytosyn_data.io.png import encode_png
from cytosyn_data.run.paths import DetectFiles, detect_dir
from cytosyn_data.run.records import SlideFacts, load_facts
from cytosyn_data.run.schemas import CANDIDATE_SCHEMA, VIEW_SIDE
from cytosyn_data.run.state import file_identity
from cytosyn_data.wsi.dl_tissue import segment_tissue
from cytosyn_data.wsi.regions import apply_regions
from cytosyn_data.wsi.slide import SlideError, make_read_plan, open_slide, resolve_mpp
from cytosyn_data.wsi.tissue import tile_tissue_fractions, tissue_mask


def tile_key(slide_id: str, x: int, y: int) -> str:
    """Unique tile key ``{slide_id}__x{x}_y{y}`` (level-0 pixels of the top-left corner)."""
    return f"{slide_id}__x{x}_y{y}"


def _view_size(w0: int, h0: int) -> tuple[int, int]:
    """(w, h) with the long side VIEW_SIDE (level 0's size when the slide is smaller)."""
    f = min(1.0, VIEW_SIDE / max(w0, h0))
    return max(1, round(w0 * f)), max(1, round(h0 * f))


def _write_png(rgb: np.ndarray, path: Path) -> None:
    atomic_write_bytes(path, encode_png(rgb), durable=False)


def detect_slide(slide: dict, cfg, work: Path) -> SlideFacts:
    """Open one slide, resolve its MPP and read plan, find tissue and candidate tiles.

    Writes ``work/detect/{slide_id}.{json,parquet,thumb.png,mask.png,view.jpg}``; returns the
    :class:`SlideFacts` saved as the json (status ``ok``, or ``failed`` with the error naming the
    file and the cause).
    """
    files = DetectFiles(detect_dir(work), slide["slide_id"])
    facts = SlideFacts(slide["slide_id"], slide["path"])
    t0 = time.perf_counter()
    src = slide.get("local_path") or slide["path"]  # a remote slide is read from its cached copy
    try:
        if slide.get("fetch_error"):
            raise SlideError(slide["fetch_error"])
        facts = replace(facts, file=slide["file"] if isinstance(slide.get("file"), dict) else file_identity(slide["path"]))
        facts, thumb, view, plan, level_dims, mask = _open(slide, src, cfg, facts)
        facts = _find_tiles(slide, cfg, files, facts, (thumb, view, mask), plan, level_dims)
    except SlideError as exc:
        facts = facts.failed(redact_text(str(exc).replace(str(src), slide["path"])))
    except Exception as exc:  # noqa: BLE001 - any failure of one slide is recorded, the run goes on
        facts = facts.failed(redact_text(f"{slide['path']}: {type(exc).__name__}: {str(exc).replace(str(src), slide['path'])}"))
    facts = replace(facts, detect_seconds=time.perf_counter() - t0)
    facts.save(files.facts)
    return facts


def _open(slide: dict, src: str, cfg, facts: SlideFacts) -> tuple:
    """Open ``src``: the record with the slide's facts, the thumbnail at ``tissue_mpp``, the view
    picture, the read plan and the read level's (w, h)."""
    with open_slide(src) as s:
        mpp0, source = resolve_mpp(s, slide.get("mpp_override"))
        plan = make_read_plan(s, mpp0, cfg.target_mpp, cfg.tile_size, cfg.mpp_tolerance, cfg.resample)
        w0, h0 = s.dimensions
        tw = max(1, int(round(w0 * mpp0 / cfg.tissue_mpp)))
        th = max(1, int(round(h0 * mpp0 / cfg.tissue_mpp)))
        thumb = s.thumbnail((tw, th))
        view = thumb if max(thumb.shape[:2]) >= VIEW_SIDE else s.thumbnail(_view_size(w0, h0))
        facts = replace(facts, backend=s.backend, vendor=s.vendor, width=w0, height=h0, levels=s.level_count,
                        mpp=mpp0, mpp_source=source, fast_reads=s.fast_reads, level_dimensions=s.level_dimensions,
                        level_downsamples=s.level_downsamples)
        mask = _tissue(s, mpp0, thumb, cfg)
        return facts, thumb, view, plan, s.level_dimensions[plan.level], mask


def _tissue(s, mpp0: float, thumb: np.ndarray, cfg) -> np.ndarray:
    """The tissue mask on the thumbnail's grid: the HSV rule, or the configured deep segmenter."""
    if cfg.segmenter == "hsv":
        return tissue_mask(thumb, mpp0 * s.dimensions[0] / thumb.shape[1], cfg.tissue)
    return segment_tissue(s, mpp0, thumb, _segmenter(cfg.segmenter, cfg.segmenter_weights), cfg.segmenter_batch,
                          cfg.tissue)


@functools.lru_cache(maxsize=2)
def _segmenter(name: str, weights: str):
    """The segmenter network, built once per worker process (on its GPU when there is one)."""
    from cytosyn_encoders.segmenters import build_segmenter  # lazy: torch, only for --segmenter hest|grandqc

    return build_segmenter(name, weights, rank_device())


def _find_tiles(slide: dict, cfg, files: DetectFiles, facts: SlideFacts, pictures: tuple, plan, level_dims) -> SlideFacts:
    """Tissue mask and candidate tiles of an opened slide; writes the detection files and returns
    the ``ok`` record."""
    thumb, view, mask = pictures
    w0, h0 = facts.width, facts.height
    mask, notes = apply_regions(mask, w0, slide.get("include_regions"), slide.get("exclude_regions"),
                                slide.get("region_class"))
    facts = replace(facts, regions={**{k: slide.get(f"{k}_regions") for k in ("include", "exclude")},
                                    **({"class": slide["region_class"]} if slide.get("region_class") else {}),
                                    **({"notes": notes} if notes else {})})
    sid = facts.slide_id
    if slide.get("coords"):  # exactly the tiles of a TRIDENT/CLAM coordinates file
        xy, overhang = read_coords(slide["coords"], plan.footprint, (w0, h0), facts.level_downsamples)
        cand = coords_candidates(sid, xy, mask, plan, (w0, h0))
        facts = replace(facts, coords=slide["coords"], coords_overhang=overhang)
    else:
        cand = grid_candidates(sid, mask, plan, level_dims, (w0, h0), cfg.tissue_threshold)
    _write_png(thumb, files.thumb)
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(view, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    atomic_write_bytes(files.view, jpg.tobytes(), durable=False)
    _write_png(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, 2), files.mask)
    write_parquet_atomic(cand, files.candidates)
    return replace(facts, status="ok", read_level=plan.level, level_mpp=plan.level_mpp, downsample=plan.downsample,
                   region=plan.region, native=plan.native, footprint=plan.footprint,
                   n_grid=int(np.prod(plan.grid_shape(level_dims))), n_candidates=cand.height,
                   tissue_area_fraction=float(mask.mean()))


def grid_candidates(sid: str, mask: np.ndarray, plan, level_dims, level0_size: tuple[int, int],
                    threshold: float) -> pl.DataFrame:
    """Grid cells (whole tiles of the read level from (0, 0)) whose tissue fraction >= ``threshold``."""
    ncol, nrow = plan.grid_shape(level_dims)
    cols, rows = np.meshgrid(np.arange(ncol), np.arange(nrow))
    cols, rows = cols.ravel(), rows.ravel()
    x0, y0 = plan.level0_xy(cols, rows)
    frac = tile_tissue_fractions(mask, x0, y0, plan.footprint, level0_size)
    keep = frac >= threshold
    return pl.DataFrame(
        {
            "key": [tile_key(sid, int(x), int(y)) for x, y in zip(x0[keep], y0[keep])],
            "slide_id": [sid] * int(keep.sum()),
            "col": cols[keep],
            "row": rows[keep],
            "x": x0[keep],
            "y": y0[keep],
            "tissue_fraction": frac[keep],
        },
        schema=CANDIDATE_SCHEMA,
    )


def coords_candidates(sid: str, xy: np.ndarray, mask: np.ndarray, plan, level0_size: tuple[int, int]) -> pl.DataFrame:
    """Candidates at given level-0 (x, y) (any position); ``col, row`` only order them row-major."""
    x0, y0 = xy[:, 0], xy[:, 1]
    frac = tile_tissue_fractions(mask, x0, y0, plan.footprint, level0_size) if len(xy) else np.zeros(0)
    return pl.DataFrame(
        {
            "key": [tile_key(sid, int(x), int(y)) for x, y in zip(x0, y0)],
            "slide_id": [sid] * len(xy),
            "col": (x0 // plan.footprint).astype(np.int32),
            "row": (y0 // plan.footprint).astype(np.int32),
            "x": x0,
            "y": y0,
            "tissue_fraction": frac,
        },
        schema=CANDIDATE_SCHEMA,
    ).sort(["row", "col", "x", "y"])


def detect_ok(work: Path, slide: dict, identity: dict | str | None = None) -> bool:
    """Detection of this slide finished and was made from the file as it is now (size and mtime,
    or size and ETag of a remote object; ``identity`` when already known)."""
    files = DetectFiles(detect_dir(work), slide["slide_id"])
    if not files.facts.exists() or not files.candidates.exists():
        return False
    try:
        facts = load_facts(files.facts)
        same_file = facts.file == (identity if identity is not None else file_identity(slide["path"]))
    except (OSError, DataError):
        return False
    return facts.ok and same_file
