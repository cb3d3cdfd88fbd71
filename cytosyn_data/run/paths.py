"""The run folder's paths in one place (DESIGN.md "Files of a run"): what each stage writes where.

The per-slide files of detection, ``RUN/work/detect/{slide_id}.*`` (:class:`DetectFiles`), are
written by the tile stage and read by its selection, the QC pictures, the HTML report and the
GeoJSON export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DetectFiles", "detect_dir", "work_dir"]


def work_dir(run: Path) -> Path:
    """``RUN/work``: the tile stage's intermediate files (detection, selection, shard plans)."""
    return Path(run) / "work"


def detect_dir(work: Path) -> Path:
    """``{work}/detect``: one set of :class:`DetectFiles` per slide."""
    return Path(work) / "detect"


@dataclass(frozen=True)
class DetectFiles:
    """What detection writes for one slide in ``folder`` (:func:`detect_dir`)."""

    folder: Path
    slide_id: str

    @classmethod
    def of_run(cls, run: Path, slide_id: str) -> "DetectFiles":
        return cls(detect_dir(work_dir(run)), slide_id)

    def _named(self, suffix: str) -> Path:
        return Path(self.folder) / f"{self.slide_id}{suffix}"

    @property
    def facts(self) -> Path:
        """``.json``: the slide's facts (size, levels, MPP, read plan), status and error."""
        return self._named(".json")

    @property
    def candidates(self) -> Path:
        """``.parquet``: every candidate tile (level-0 pixels, tissue fraction)."""
        return self._named(".parquet")

    @property
    def thumb(self) -> Path:
        """``.thumb.png``: the slide at the tissue-detection resolution."""
        return self._named(".thumb.png")

    @property
    def mask(self) -> Path:
        """``.mask.png``: the tissue mask at that resolution."""
        return self._named(".mask.png")

    @property
    def view(self) -> Path:
        """``.view.jpg``: the slide at VIEW_SIDE px on its long side, for the HTML report."""
        return self._named(".view.jpg")
