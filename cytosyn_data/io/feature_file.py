"""Feature matrices larger than memory: a float32 ``.npy`` written batch by batch, read memory-mapped.

Used by curation (iBOT features of every tile) and evaluation (extractor features of every image):
at 40M tiles x 384 or 4M images x 2048 the matrix is tens of GiB, so it is never held in memory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from cytosyn_data.io.atomic import tmp_path


class FeatureFileWriter:
    """A float32 [N, D] ``.npy`` written batch by batch (N unknown in advance): rows go to a raw
    temporary file, then the header and the rows are copied into place and renamed. Memory holds
    one batch, never the N x D array; the result is read back memory-mapped."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.raw = tmp_path(self.path.with_suffix(".raw"))
        self._fh = open(self.raw, "wb")
        self.n, self.dim = 0, None

    def append(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.dim is None:
            self.dim = x.shape[1]
        self._fh.write(x.tobytes())
        self.n += x.shape[0]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self._fh.close()
        if exc_type is None:
            tmp = tmp_path(self.path)
            with open(tmp, "wb") as out, open(self.raw, "rb") as src:
                np.lib.format.write_array_header_1_0(
                    out, {"descr": "<f4", "fortran_order": False, "shape": (self.n, self.dim or 0)})
                shutil.copyfileobj(src, out, 1 << 24)
            os.replace(tmp, self.path)
        self.raw.unlink(missing_ok=True)


def read_rows(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` of ``x``; from a memory map (``np.load(..., mmap_mode="r")``) they are read
    with a plain file read, so that the pages go to the page cache and not into this process's
    resident memory, as touching the map would."""
    if x.ndim == 2 and _whole(x):  # the map of a whole file, not a view
        row = x.shape[1] * x.dtype.itemsize
        hi = min(hi, x.shape[0])
        with open(x.filename, "rb") as f:
            f.seek(x.offset + lo * row)
            return np.frombuffer(f.read(max(hi - lo, 0) * row), dtype=x.dtype).reshape(-1, x.shape[1])
    return np.asarray(x[lo:hi])


def take_rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (sorted) of ``x``; from the memory map of a whole file each row is read with
    ``os.pread`` (touching the map would fault in its neighbours too: a 50,000-row sample of a
    1M-row file made the whole file resident)."""
    idx = np.asarray(idx, dtype=np.int64)
    if x.ndim != 2 or not _whole(x):
        return np.asarray(x[idx])
    row = x.shape[1] * x.dtype.itemsize
    out = np.empty((len(idx), x.shape[1]), dtype=x.dtype)
    fd = os.open(x.filename, os.O_RDONLY)
    try:
        for j, i in enumerate(idx):
            out[j] = np.frombuffer(os.pread(fd, row, x.offset + int(i) * row), dtype=x.dtype)
    finally:
        os.close(fd)
    return out


def _whole(x: np.ndarray) -> bool:
    row = x.shape[1] * x.dtype.itemsize
    return bool(isinstance(x, np.memmap) and x.filename and x.flags.c_contiguous
                and os.path.getsize(x.filename) == x.offset + x.shape[0] * row)
