"""Tile coordinates as TRIDENT/CLAM-style HDF5, both ways.

Export (``cytosyn-data export-h5 --run RUN``): ``RUN/h5/{slide_id}.h5`` with a ``coords`` dataset
(int64 [N, 2], the level-0 top-left pixel (x, y) of every written tile, in tiles.parquet order) whose
attributes say how to read them: ``patch_size`` (224, pixels at the target resolution),
``patch_size_level0`` (the tile side in level-0 pixels), ``patch_level`` (the pyramid level read),
``downsample`` (of that level), ``level0_mpp``, ``target_mpp``, ``level0_magnification`` and
``target_magnification`` (10 / MPP: 0.25 MPP = 40x), ``overlap`` (0), ``name`` (the slide_id); and a
``keys`` dataset with the tile keys.

Import (``cytosyn-data tile --coords DIR``, or ``--coords FILE.h5`` for one slide): ``DIR/{slide_id}.h5``
gives the exact tiles of that slide instead of the tissue grid: a ``coords`` dataset [N, 2] of level-0 (x, y); when it carries
``patch_size_level0`` it must match this run's tile side (1% tolerance), so the same patches are read.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import polars as pl

from cytosyn_data.core.errors import DataError, SlideError
from cytosyn_data.io.atomic import tmp_path


def coords_file(source: str | Path | None, slide_id: str) -> str | None:
    """``source/{slide_id}.h5`` for a folder; ``source`` itself for one ``.h5`` file (one slide)."""
    if source is None:
        return None
    return str(source) if Path(source).is_file() else str(Path(source) / f"{slide_id}.h5")


def read_coords(path: str | Path, footprint: float, level0_size: tuple[int, int]) -> np.ndarray:
    """int64 [N, 2] level-0 (x, y) of ``path``'s ``coords``, checked against the slide and the tile side."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no coordinates file for this slide (--coords needs one per slide)")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise SlideError(f"{path}: no 'coords' dataset (datasets: {sorted(f.keys())})")
            ds = f["coords"]
            coords = np.asarray(ds[()])
            side = ds.attrs.get("patch_size_level0")
    except OSError as exc:
        raise SlideError(f"{path}: not a readable HDF5 file ({exc})") from None
    if coords.ndim != 2 or coords.shape[1] != 2 or not np.issubdtype(coords.dtype, np.number):
        raise SlideError(f"{path}: coords must be a numeric [N, 2] array of level-0 (x, y), got {coords.dtype} {coords.shape}")
    if side is not None and abs(float(np.asarray(side).item()) - footprint) > 0.01 * footprint:
        raise SlideError(f"{path}: patch_size_level0 {float(np.asarray(side).item()):g} differs from this run's tile "
                         f"side {footprint:g} level-0 px (other tile size or resolution)")
    coords = coords.astype(np.int64)
    w0, h0 = level0_size
    bad = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] + footprint > w0 + 1) | (coords[:, 1] + footprint > h0 + 1)
    if bad.any():
        x, y = coords[np.argmax(bad)]
        raise SlideError(f"{path}: tile at ({x}, {y}) leaves the slide ({w0} x {h0} level-0 px); {int(bad.sum())} such")
    _, first = np.unique(coords, axis=0, return_index=True)
    if len(first) != len(coords):
        raise SlideError(f"{path}: {len(coords) - len(first)} duplicate coordinates")
    return coords


def export_h5(run: str | Path) -> list[Path]:
    """Write ``RUN/h5/{slide_id}.h5`` for every slide with written tiles; returns the paths."""
    run = Path(run)
    for need in ("slides.parquet", "tiles.parquet"):
        if not (run / need).exists():
            raise DataError(f"{run / need}: not found; is {run} a finished tile run?")
    slides = {r["slide_id"]: r for r in pl.read_parquet(run / "slides.parquet").iter_rows(named=True)}
    written = []
    for (sid,), part in pl.read_parquet(run / "tiles.parquet").group_by("slide_id", maintain_order=True):
        s, row = slides[sid], part.row(0, named=True)
        path = run / "h5" / f"{sid}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(path)
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=part.select("x", "y").to_numpy().astype(np.int64))
            attrs = {"patch_size": 224 if row["footprint"] is None else int(round(row["footprint"] * s["mpp"] / row["mpp"])),
                     "patch_size_level0": float(row["footprint"]), "patch_level": int(row["read_level"]),
                     "downsample": float(row["downsample"]), "level0_mpp": float(s["mpp"]), "target_mpp": float(row["mpp"]),
                     "level0_magnification": 10.0 / float(s["mpp"]), "target_magnification": 10.0 / float(row["mpp"]),
                     "overlap": 0, "name": sid}
            ds.attrs.update(attrs)
            f.create_dataset("keys", data=np.array(part["key"].to_list(), dtype=object), dtype=h5py.string_dtype())
        tmp.replace(path)
        written.append(path)
    return written
