"""Open whole-slide images and read regions at an exact target resolution.

Backends: openslide-python first, tiffslide as fallback. Coordinates are level-0
pixels unless a name says otherwise; resolutions are microns per pixel (MPP).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cytosyn_data.core.errors import SlideError  # noqa: F401  (raised and caught under this name)
from cytosyn_data.wsi.pixels import composite_on_white, level_pixel
from cytosyn_data.wsi.tiff_reader import TiledTiffReader

#: the largest box pre-reduction of a thumbnail's level: a power of two, so it divides TIFF tiles of
#: 240 (Aperio), 256 and 512 px and the fast reader reduces tile by tile
MAX_PREREDUCE = 16

#: The one antialiased downsampling filter (used whenever no level is within tolerance).
RESAMPLE_FILTERS = {"area": cv2.INTER_AREA}
RESAMPLE_NAMES = {"area": "cv2.INTER_AREA (area averaging, antialiased)"}


class SlideHandle:
    """A uniform view over an openslide or tiffslide object."""

    def __init__(self, path: Path, backend: str, obj, fast: bool = True):
        self.path = Path(path)
        self.backend = backend
        self._obj = obj
        self.dimensions: tuple[int, int] = tuple(obj.dimensions)
        self.level_dimensions: list[tuple[int, int]] = [tuple(d) for d in obj.level_dimensions]
        self.level_downsamples: list[float] = [float(d) for d in obj.level_downsamples]
        self.properties: dict[str, str] = {str(k): str(v) for k, v in obj.properties.items()}
        self._fast = None
        if fast and self.dimensions and self.level_count and self.path.is_file():
            try:
                self._fast = TiledTiffReader(path, self.level_dimensions)
            except Exception:  # noqa: BLE001 - not a plain tiled TIFF pyramid: use the backend
                self._fast = None

    @property
    def fast_reads(self) -> bool:
        """True when regions are decoded directly from the TIFF tiles (see tiff_reader)."""
        return self._fast is not None

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str:
        p = self.properties
        return p.get("openslide.vendor") or p.get("tiffslide.vendor") or "unknown"

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size`` (w, h) pixels of ``level`` at level-0 ``location``; RGBA composited on white.

        Returns uint8 [h, w, 3].
        """
        if self._fast is not None:
            lx, ly = level_pixel(location, self.level_downsamples[level])
            lw, lh = self.level_dimensions[level]
            if lx + size[0] <= lw and ly + size[1] <= lh:
                return self._fast.read(level, lx, ly, size[0], size[1])
        if self.backend == "openslide":
            rgba = np.asarray(self._obj.read_region(location, level, size))
        else:
            rgba = self._obj.read_region(location, level, size, as_array=True)
        return composite_on_white(rgba)

    def thumbnail(self, size: tuple[int, int]) -> np.ndarray:
        """RGB image of exactly ``size`` (w, h), uint8 [h, w, 3], by one rule for every reader (so a
        slide gives the same tissue mask, candidates and tiles through openslide, tiffslide, the
        fast TIFF reader or a DICOM series of it): the coarsest level at least as fine as ``size``,
        box-averaged over k x k level pixels (k the largest power of two <= 16 that keeps it at least
        ``size``; the last partial blocks, under k level pixels, dropped), then area-resized to
        ``size``. The level is read in bands (the fast reader: tile by tile), never whole."""
        w, h = size
        level = 0
        for i, (lw, lh) in enumerate(self.level_dimensions):
            if lw >= w and lh >= h:
                level = i
        lw, lh = self.level_dimensions[level]
        want = max(1, int(min(lw / w, lh / h)))
        k = 1
        while k * 2 <= min(want, MAX_PREREDUCE):
            k *= 2
        return cv2.resize(self._box_reduced(level, k), (w, h), interpolation=cv2.INTER_AREA)

    def _box_reduced(self, level: int, k: int, band_bytes: int = 64 * 2**20) -> np.ndarray:
        """``level`` box-averaged over k x k blocks from (0, 0): uint8 [lh // k, lw // k, 3]."""
        lw, lh = self.level_dimensions[level]
        ow, oh = lw // k, lh // k
        if self._fast is not None and all(t % k == 0 for t in self._fast.tile_size(level)):
            return self._fast.read_reduced(level, k, exact=True)[:oh, :ow]
        out = np.empty((oh, ow, 3), np.uint8)
        rows = max(k, band_bytes // max(1, ow * k * 3) // k * k)  # level rows per read, a multiple of k
        ds = self.level_downsamples[level]
        for y in range(0, oh * k, rows):
            n = min(rows, oh * k - y)
            px = self.read_rgb((0, int(round(y * ds))), level, (ow * k, n))
            out[y // k:(y + n) // k] = cv2.resize(px, (ow, n // k), interpolation=cv2.INTER_AREA) if k > 1 else px
        return out

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        self._obj.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dicom_series_file(folder: Path) -> Path:
    """A file of the DICOM WSI series in ``folder`` (one folder = one series = one slide); openslide
    finds the series' other instances (levels, label, overview) beside it."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:
        raise SlideError(f"{folder}: a folder is a slide only when it holds a DICOM WSI series (.dcm files); none here")
    return files[0]


class TiffHandle:
    """``read_rgb`` of a plain tiled-TIFF pyramid through the fast reader alone, openslide not opened:
    for a slide whose geometry (level sizes and downsamples) detection already read, optionally
    holding one row band of a level (see TiledTiffReader.hold_band)."""

    backend = "tiff"

    def __init__(self, path: str | Path, level_dimensions, level_downsamples, band: tuple[int, int] | None = None):
        self.path = Path(path)
        self._r = TiledTiffReader(path, [tuple(d) for d in level_dimensions])
        if band is not None:
            self._r.hold_band(*band)
        self.level_downsamples = [float(d) for d in level_downsamples]

    @property
    def decoded(self) -> int:
        """TIFF tiles decoded so far (each once per band pass: see TiledTiffReader.hold_band)."""
        return self._r.decoded

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        lx, ly = level_pixel(location, self.level_downsamples[level])
        return self._r.read(level, lx, ly, size[0], size[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._r.close()


def load_wsi(path: str | Path, reader: str = "auto", *, level_dimensions=None, level_downsamples=None,
             band: tuple[int, int] | None = None):
    """The one reader factory (as TRIDENT's ``WSIFactory.load_wsi``). ``reader``: ``auto`` (openslide,
    then tiffslide, with the fast TIFF reader inside when the file allows: :func:`open_slide`);
    ``openslide`` or ``tiffslide`` (that backend alone, no fast reader); ``tiff`` (the fast TIFF
    reader alone, :class:`TiffHandle`, given the pyramid's geometry)."""
    if reader == "auto":
        return open_slide(path)
    if reader in ("openslide", "tiffslide"):
        return open_slide(path, backends=(reader,), fast=False)
    if reader == "tiff":
        if level_dimensions is None or level_downsamples is None:
            raise ValueError("load_wsi(reader='tiff') needs level_dimensions and level_downsamples")
        return TiffHandle(path, level_dimensions, level_downsamples, band)
    raise ValueError(f"unknown reader {reader!r} (auto, openslide, tiffslide, tiff)")


def open_slide(path: str | Path, backends: tuple[str, ...] = ("openslide", "tiffslide"), fast: bool = True) -> SlideHandle:
    """Open with openslide, fall back to tiffslide; raise SlideError naming the file and every cause.
    ``fast``: decode regions of a plain tiled TIFF with the fast reader (same pixels, tested).

    ``path`` is a slide file, or a folder holding one DICOM WSI series (read with openslide's DICOM
    support; the MPP comes from the DICOM pixel spacing)."""
    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    errors = []
    for backend in backends:
        try:
            return SlideHandle(path, backend, _backend_object(path, backend, errors), fast)
        except Exception as exc:  # noqa: BLE001 - every backend failure is reported
            errors.append(f"{backend}: {type(exc).__name__}: {exc}")
    raise SlideError(f"{path}: cannot open slide ({'; '.join(errors)})")


def _backend_object(path: Path, backend: str, errors: list[str]):
    if backend == "openslide":
        import openslide  # here: its native library may be missing

        return openslide.OpenSlide(str(dicom_series_file(path) if path.is_dir() else path))
    import tiffslide  # here: the fallback backend, imported only when openslide fails

    if path.is_dir():
        raise SlideError(f"{path}: DICOM series need openslide >= 4 ({errors[0] if errors else 'not tried'})")
    return tiffslide.TiffSlide(str(path))


_RES_UNIT_MICRONS = {"centimeter": 1e4, "inch": 25400.0, "3": 1e4, "2": 25400.0}


def resolve_mpp(slide: SlideHandle, override: float | None = None) -> tuple[float, str]:
    """Level-0 microns per pixel and its source, by the chain in DESIGN.md.

    override -> ``openslide.mpp-x`` (or tiffslide's) -> Aperio ``MPP`` -> TIFF resolution tags.
    Raises SlideError when none is found.
    """
    if override is not None and override == override and override > 0:
        return float(override), "override"
    p = slide.properties
    for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
        v = _positive_float(p.get(key))
        if v:
            return v, "openslide" if key.startswith("openslide") else "tiffslide"
    v = _positive_float(p.get("aperio.MPP"))
    if v:
        return v, "aperio"
    xres = _positive_float(p.get("tiff.XResolution"))
    unit = str(p.get("tiff.ResolutionUnit", "")).lower()
    if xres and unit in _RES_UNIT_MICRONS:
        return _RES_UNIT_MICRONS[unit] / xres, "tiff"
    raise SlideError(
        f"{slide.path}: no microns-per-pixel in the metadata (openslide.mpp-x, aperio MPP, TIFF "
        "resolution); give it with --mpp-override or an 'mpp' column in the slide table"
    )


def _positive_float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 and np.isfinite(v) else None


@dataclass(frozen=True)
class ReadPlan:
    """How tiles of ``tile_size`` px at ``target_mpp`` are read from one slide.

    A tile is ``region`` x ``region`` pixels of ``level`` (native when region == tile_size),
    downsampled with ``resample`` otherwise. Tiles lie on a grid of ``region`` level pixels;
    ``footprint`` is that step in level-0 pixels (rounded; exact in level pixels).
    """

    level: int
    level_mpp: float
    downsample: float
    region: int
    tile_size: int
    target_mpp: float
    native: bool
    resample: str

    @property
    def footprint(self) -> float:
        """Tile side in level-0 pixels (float)."""
        return self.region * self.downsample

    def grid_shape(self, level_dims: tuple[int, int]) -> tuple[int, int]:
        """(columns, rows) of whole tiles that fit in the level."""
        w, h = level_dims
        return w // self.region, h // self.region

    def level0_xy(self, col: np.ndarray, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 top-left pixel of grid cells (rounded to integers)."""
        step = self.region * self.downsample
        return np.rint(col * step).astype(np.int64), np.rint(row * step).astype(np.int64)


def make_read_plan(
    slide: SlideHandle,
    mpp0: float,
    target_mpp: float = 0.5,
    tile_size: int = 224,
    tolerance: float = 0.02,
    resample: str = "area",
) -> ReadPlan:
    """Pick the coarsest level not coarser than the target (within ``tolerance``).

    Native read when that level's MPP is within ``tolerance`` of the target, else a larger
    region is read and downsampled with one antialiased filter. Never upsamples.
    """
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"unknown resample filter {resample!r}; known: {sorted(RESAMPLE_FILTERS)}")
    mpps = [mpp0 * d for d in slide.level_downsamples]
    usable = [i for i, m in enumerate(mpps) if m <= target_mpp * (1 + tolerance)]
    if not usable:
        raise SlideError(
            f"{slide.path}: level-0 resolution {mpp0:.4f} MPP is coarser than the target "
            f"{target_mpp} MPP; tiles would need upsampling"
        )
    level = max(usable, key=lambda i: mpps[i])
    level_mpp = mpps[level]
    native = abs(level_mpp / target_mpp - 1) <= tolerance
    region = tile_size if native else int(round(tile_size * target_mpp / level_mpp))
    return ReadPlan(
        level=level,
        level_mpp=level_mpp,
        downsample=slide.level_downsamples[level],
        region=region,
        tile_size=tile_size,
        target_mpp=target_mpp,
        native=native,
        resample=resample,
    )


def resize_to_tile(pixels: np.ndarray, plan: ReadPlan) -> np.ndarray:
    """Downsample a region [region, region, 3] to [tile, tile, 3] (identity when native)."""
    if plan.native:
        return pixels
    return cv2.resize(
        pixels, (plan.tile_size, plan.tile_size), interpolation=RESAMPLE_FILTERS[plan.resample]
    )
