"""Feature extractors of the evaluation: the encoders of :mod:`cytosyn_encoders` (one registry for
the whole toolkit: architecture, input size, resize filter, normalisation and output in one place),
and the preprocessing ablations (JPEG round trip, centre crop)."""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image

from cytosyn_encoders import REGISTRY, Encoder, build_encoder  # noqa: F401  (the one registry)


def build_extractor(name: str, weights) -> Encoder:
    """The evaluation extractor ``name``: an encoder of the registry (``weights``: a local file, or
    ``random:small`` for tests)."""
    return build_encoder(name, weights)


# ------------------------------------------------------------ preprocessing
def jpeg_roundtrip(quality: int) -> Callable:
    """uint8 [H, W, 3] -> the same tile after JPEG encoding at ``quality`` (Pillow, 4:2:0)."""
    def f(img):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=2)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))

    f.__name__ = f"jpeg{quality}"
    return f


def center_crop(size: int) -> Callable:
    """uint8 [H, W, 3] -> its central size x size pixels (e.g. 256 -> 224)."""
    def f(img):
        h, w = img.shape[:2]
        y, x = (h - size) // 2, (w - size) // 2
        return img[y : y + size, x : x + size]

    f.__name__ = f"centercrop{size}"
    return f
