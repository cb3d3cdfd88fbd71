"""Typed per-slide records of the tile stage (instead of an untyped dict travelling through it).

- :class:`SlideFacts`: what detection learnt of one slide, saved as ``work/detect/{slide_id}.json``
  (:class:`~cytosyn_data.run.paths.DetectFiles`). Read by selection and planning, the QC pictures,
  the slides table and a resumed run.
- :class:`SlideRead`: the part of it a worker needs to read tiles (the file, its pyramid, and the
  read plan detection chose), carried by each shard's work unit.

Units: ``width``, ``height``, ``level_dimensions`` in pixels of their level (level 0 for the first
two); ``mpp`` and ``level_mpp`` in microns per pixel; ``footprint`` is a tile's side in level-0
pixels; ``downsample`` is the read level's, ``region`` its read region's side in its own pixels.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from cytosyn_data.core.errors import DataError
from cytosyn_data.io.atomic import write_json_atomic

__all__ = ["SlideFacts", "SlideRead", "load_facts", "tissue_warning"]

#: a tissue mask over more than this fraction of the slide is suspicious (glass read as tissue)
TISSUE_WARN_ABOVE = 0.9
#: a tissue mask under this fraction of the slide is suspicious (faint or missed tissue)
TISSUE_WARN_BELOW = 0.005


def tissue_warning(fraction: float | None) -> str | None:
    """The QC warning of a slide whose tissue mask covers ``fraction`` of it, or None."""
    if fraction is None:
        return None
    if fraction > TISSUE_WARN_ABOVE:
        return (f"tissue mask covers {fraction:.0%} of the slide (> {TISSUE_WARN_ABOVE:.0%}): glass read as tissue? "
                "check the QC picture, or try another --segmenter")
    if fraction < TISSUE_WARN_BELOW:
        return (f"tissue mask covers {fraction:.2%} of the slide (< {TISSUE_WARN_BELOW:.1%}): faint or missed tissue? "
                "check the QC picture")
    return None


@dataclass(frozen=True)
class SlideRead:
    """What a worker needs to read one slide's tiles. ``url``: where a remote slide lies when
    ``path`` is its local cached copy (named in errors)."""

    path: str
    file: dict | str | None
    fast_reads: bool
    level_dimensions: tuple
    level_downsamples: tuple
    read_level: int
    level_mpp: float
    downsample: float
    region: int
    native: bool
    footprint: float
    url: str | None = None

    def identity(self) -> dict:
        """The fields that make the tiles' bytes (not where the file lies: neither path nor url)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("path", "url")}

    def located(self, local: str) -> "SlideRead":
        """This slide read from ``local``, a cached copy of ``self.path`` (then named as ``url``)."""
        return dataclasses.replace(self, path=local, url=self.path)


@dataclass(frozen=True)
class SlideFacts:
    """Detection's record of one slide (``status`` ``ok``, or ``failed`` with ``error`` naming the
    file and the cause). Fields after ``file`` are None until detection gets that far."""

    slide_id: str
    path: str
    status: str = "failed"
    error: str | None = None
    file: dict | str | None = None
    backend: str | None = None
    vendor: str | None = None
    width: int | None = None
    height: int | None = None
    levels: int | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    fast_reads: bool | None = None
    level_dimensions: tuple | None = None
    level_downsamples: tuple | None = None
    regions: dict | None = None
    coords: str | None = None
    coords_overhang: int | None = None  # patches of the coords file that overhang the slide's edge (read padded white)
    read_level: int | None = None
    level_mpp: float | None = None
    downsample: float | None = None
    region: int | None = None
    native: bool | None = None
    footprint: float | None = None
    n_grid: int | None = None
    n_candidates: int | None = None
    tissue_area_fraction: float | None = None
    detect_seconds: float | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def failed(self, error: str) -> "SlideFacts":
        """This record marked failed with ``error`` (a later stage found the slide unreadable)."""
        return dataclasses.replace(self, status="failed", error=error)

    def read(self) -> SlideRead:
        """The reading part (only for an ``ok`` record)."""
        if not self.ok:
            raise ValueError(f"slide {self.slide_id} failed detection: {self.error}")
        return SlideRead(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SlideRead) if f.name != "url"})

    def to_json(self) -> dict:
        """The record as saved: the fields that are set (``error`` always)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "error"}

    def save(self, path: Path) -> None:
        write_json_atomic(self.to_json(), path)


def load_facts(path: Path) -> SlideFacts:
    """The :class:`SlideFacts` saved at ``path``; a file that is not one is a DataError naming it."""
    try:
        obj = json.loads(Path(path).read_text())
        return SlideFacts(**obj)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a slide detection record ({exc}); delete it to detect the slide again") from exc
