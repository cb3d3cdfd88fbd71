"""Write a slide table for the demo: the shared real slides when present, else a generated TIFF."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wsi"


def generated_slide(path: Path, mpp: float = 0.25, size: int = 2048) -> None:
    """A tiled RGB TIFF at ``mpp`` with a textured pink disc ('tissue') on white glass."""
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (0.42 * size) ** 2
    img = np.full((size, size, 3), 245, np.uint8)
    noise = rng.integers(0, 60, (size, size, 1))
    img[disc] = (np.array([170, 70, 150]) + noise)[disc].clip(0, 255)
    res = 1e4 / mpp
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(res, res), resolutionunit="CENTIMETER")


def main(table: str) -> None:
    out = Path(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    if SHARED.exists():
        rows = [
            {"path": str(SHARED / "cmu-1-small-region.svs"), "slide_id": None, "mpp": None},
            # this TCGA frozen section has no MPP in its metadata; 0.25 is given in the table
            {"path": str(SHARED / "tcga-cr-7395-01a-01-ts1.svs"), "slide_id": None, "mpp": 0.25},
        ]
    else:
        slide = (out.parent / "generated-0.25mpp.tif").resolve()
        generated_slide(slide)
        rows = [{"path": str(slide), "slide_id": None, "mpp": None}]
    pl.DataFrame(rows, schema={"path": pl.String, "slide_id": pl.String, "mpp": pl.Float64}).write_csv(out)
    print(f"slide table: {out} ({len(rows)} slides)")


if __name__ == "__main__":
    main(sys.argv[1])
