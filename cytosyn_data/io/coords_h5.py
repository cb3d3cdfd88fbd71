"""Patch coordinates in TRIDENT's and CLAM's HDF5 files: find, read and check them, and write them.

Both tools store a ``coords`` dataset (int [N, 2], level-0 top-left x, y) whose attributes say how
to read each patch, in two different senses of ``patch_size``:

- TRIDENT (``{job}/{mag}x_{size}px_{overlap}px_overlap/patches/{name}_patches.h5``): ``patch_size``
  is the side at the target magnification; the read area is
  ``round(patch_size * level0_magnification / target_magnification)`` level-0 pixels (WSIPatcher),
  also stored as the int ``patch_size_level0``; magnifications are TRIDENT's nominal ones (80, 60,
  40, 20, 10, 5 from the MPP, :func:`nominal_magnification`).
- CLAM (``{save_dir}/patches/{slide_id}.h5``): ``patch_size`` is the side in pixels of
  ``patch_level``, read as ``read_region(coord, patch_level, (patch_size, patch_size))``.

One file cannot serve both when a tile is resampled (a 40x slide read for 0.5 microns per pixel),
so :func:`write_trident` and :func:`write_clam` each write what their consumer needs. The names of
files follow the consumers: the slide file's name without its extension (:func:`slide_name`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h5py
import numpy as np

from cytosyn_data.core.errors import SlideError
from cytosyn_data.io.atomic import tmp_path

__all__ = ["PatchCoords", "coords_file", "nominal_magnification", "read_coords", "slide_name", "write_clam",
           "write_trident"]

#: the layouts looked for under ``--coords DIR``: ours, CLAM's and TRIDENT's (and TRIDENT's patches folder itself)
LAYOUTS = ("{name}.h5", "patches/{name}.h5", "patches/{name}_patches.h5", "{name}_patches.h5")

#: TRIDENT's nominal magnification of a slide: the first whose MPP bound exceeds the slide's MPP
_MAGNIFICATIONS = ((0.16, 80), (0.2, 60), (0.3, 40), (0.6, 20), (1.2, 10), (2.4, 5))


def nominal_magnification(mpp: float) -> int:
    """The objective magnification TRIDENT assigns to a level-0 MPP (microns per pixel): 0.25 -> 40."""
    for bound, mag in _MAGNIFICATIONS:
        if mpp < bound:
            return mag
    raise ValueError(f"MPP {mpp} is coarser than any magnification TRIDENT names (5x needs < 2.4)")


def slide_name(path: str) -> str:
    """The name TRIDENT and CLAM give a slide: its file name without the last extension."""
    path = urlsplit(str(path)).path if "://" in str(path) else str(path)  # a URL's query is not its name
    return os.path.splitext(os.path.basename(path.rstrip("/")))[0]


def coords_file(source: str | Path | None, slide_id: str, path: str | None = None) -> str | None:
    """The coordinates file of a slide under ``source`` (a folder in any of :data:`LAYOUTS`, by
    slide_id or by the slide file's name), ``source`` itself when it is one file, or None.
    A slide without a file gets ``source/{slide_id}.h5``, which :func:`read_coords` reports missing."""
    if source is None:
        return None
    if Path(source).is_file():
        return str(source)
    names = dict.fromkeys([slide_id] + ([slide_name(path)] if path else []))
    found = [Path(source) / lay.format(name=n) for n in names for lay in LAYOUTS]
    hits = [p for p in found if p.is_file()]
    if len(hits) > 1:
        raise SlideError(f"{source}: several coordinates files for slide {slide_id}: {', '.join(map(str, hits))}")
    return str(hits[0] if hits else found[0])


@dataclass(frozen=True)
class PatchCoords:
    """The patches of one file: level-0 (x, y) int64 [N, 2], their side in level-0 pixels (None when
    the file does not say) and which convention said it (``trident``, ``clam`` or ``plain``)."""

    xy: np.ndarray
    side_level0: float | None
    convention: str


def _side(attrs, level_downsamples: list[float]) -> tuple[float | None, str]:
    """The patch side in level-0 pixels from the attributes, by TRIDENT's rule, else CLAM's."""
    if "patch_size_level0" in attrs:
        return float(np.asarray(attrs["patch_size_level0"]).item()), "trident"
    if {"patch_size", "level0_magnification", "target_magnification"} <= set(attrs):
        src, dst = float(attrs["level0_magnification"]), float(attrs["target_magnification"])
        return float(round(float(attrs["patch_size"]) * src / dst)), "trident"
    if {"patch_size", "patch_level"} <= set(attrs):
        level = int(attrs["patch_level"])
        if "downsample" in attrs:
            ds = float(np.ravel(attrs["downsample"])[0])
        elif level < len(level_downsamples):
            ds = level_downsamples[level]
        else:
            raise SlideError(f"patch_level {level} but the slide has {len(level_downsamples)} level(s)")
        return float(attrs["patch_size"]) * ds, "clam"
    return None, "plain"


def load_coords(path: str | Path, level_downsamples: list[float]) -> PatchCoords:
    """The ``coords`` of ``path`` and the side its attributes give; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no coordinates file for this slide (--coords looks for "
                         f"{', '.join(LAYOUTS)} by slide_id and by file name)")
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise SlideError(f"{path}: no 'coords' dataset (datasets: {sorted(f.keys())})")
            xy = np.asarray(f["coords"][()])
            attrs = dict(f["coords"].attrs)
    except OSError as exc:
        raise SlideError(f"{path}: not a readable HDF5 file ({exc})") from None
    if xy.size == 0:
        xy = xy.reshape(0, 2)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.issubdtype(xy.dtype, np.number):
        raise SlideError(f"{path}: coords must be a numeric [N, 2] array of level-0 (x, y), got {xy.dtype} {xy.shape}")
    try:
        side, convention = _side(attrs, level_downsamples)
    except SlideError as exc:
        raise SlideError(f"{path}: {exc}") from None
    return PatchCoords(xy.astype(np.int64), side, convention)


def read_coords(path: str | Path, footprint: float, level0_size: tuple[int, int],
                level_downsamples: list[float] = (1.0,)) -> tuple[np.ndarray, int]:
    """int64 [N, 2] level-0 (x, y) of ``path``, checked against the slide and this run's tile side
    ``footprint`` (level-0 pixels; 1% tolerance), and how many patches overhang the slide's edge
    (TRIDENT and CLAM keep them; they are read with glass white beyond the edge)."""
    pc = load_coords(path, list(level_downsamples))
    if pc.side_level0 is not None and abs(pc.side_level0 - footprint) > 0.01 * footprint:
        raise SlideError(f"{path}: its patches are {pc.side_level0:g} level-0 px ({pc.convention} attributes) but this "
                         f"run's tiles are {footprint:g} level-0 px; tile with the same size and resolution")
    xy, (w0, h0) = pc.xy, level0_size
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w0) | (xy[:, 1] >= h0)
    if outside.any():
        x, y = xy[np.argmax(outside)]
        raise SlideError(f"{path}: patch at ({x}, {y}) starts outside the slide ({w0} x {h0} level-0 px); "
                         f"{int(outside.sum())} such: coordinates of another slide?")
    _, first = np.unique(xy, axis=0, return_index=True)
    if len(first) != len(xy):
        raise SlideError(f"{path}: {len(xy) - len(first)} duplicate coordinates")
    overhang = (xy[:, 0] + footprint > w0) | (xy[:, 1] + footprint > h0)
    return xy, int(overhang.sum())


def _write(path: Path, xy: np.ndarray, keys: list[str], attrs: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=np.asarray(xy, np.int64).reshape(-1, 2), maxshape=(None, 2))
        ds.attrs.update(attrs)
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
    tmp.replace(path)
    return path


def write_trident(folder: Path, name: str, xy: np.ndarray, keys: list[str], *, tile_size: int, footprint: float,
                  mpp: float, target_mpp: float, level0_size: tuple[int, int]) -> Path:
    """``folder/patches/{name}_patches.h5`` as TRIDENT's ``coords_to_h5`` writes it (ints where it
    writes ints). ``target_magnification`` is set so that TRIDENT's read area,
    ``round(patch_size * level0_magnification / target_magnification)``, is exactly ``footprint``
    rounded: our tiles' area, not the nominal one (448 px on a 0.2527-MPP slide, for 443)."""
    src = nominal_magnification(mpp)
    side = int(round(footprint))
    dst = src * tile_size / footprint
    dst = int(round(dst)) if abs(dst - round(dst)) < 1e-6 else dst
    attrs = {"patch_size": int(tile_size), "patch_size_level0": side, "level0_magnification": src,
             "target_magnification": dst, "overlap": 0, "name": name, "savetodir": str(folder),
             "level0_width": int(level0_size[0]), "level0_height": int(level0_size[1]),
             "level0_mpp": float(mpp), "target_mpp": float(target_mpp)}
    return _write(Path(folder) / "patches" / f"{name}_patches.h5", xy, keys, attrs)


def write_clam(folder: Path, name: str, xy: np.ndarray, keys: list[str], *, patch_level: int, region: int,
               level_downsample: float, level_dim: tuple[int, int]) -> Path:
    """``folder/patches/{name}.h5`` as CLAM's ``create_patches_fp.py`` writes it: ``patch_size`` is
    ``region``, the tile's side in pixels of ``patch_level`` (what CLAM's ``Whole_Slide_Bag_FP``
    reads before its transforms resize it)."""
    attrs = {"patch_size": int(region), "patch_level": int(patch_level),
             "downsample": np.array([level_downsample, level_downsample], np.float64),
             "downsampled_level_dim": np.array(level_dim, np.int64), "level_dim": np.array(level_dim, np.int64),
             "name": name, "save_path": str(Path(folder) / "patches")}
    return _write(Path(folder) / "patches" / f"{name}.h5", xy, keys, attrs)
