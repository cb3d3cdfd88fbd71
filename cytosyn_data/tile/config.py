"""The settings of `cytosyn-data tile` (``--config tile``, ``cytosyn_data/configs/tile.yaml``, section ``tile``), validated at the
edge: one line naming the key and the cause."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from cytosyn_data.core.checks import fraction, integer, non_negative, one_of, positive
from cytosyn_data.core.errors import UsageError
from cytosyn_data.run.state import file_identity
from cytosyn_data.wsi.slide import RESAMPLE_NAMES
from cytosyn_data.wsi.tissue import TissueParams

#: the tissue segmenters: the HSV rule, or a deep network of cytosyn_encoders.segmenters
SEGMENTER_NAMES = ("hsv", "hest", "grandqc")


@dataclass(frozen=True)
class TileConfig:
    """Settings of the tile stage (``--config tile``, ``cytosyn_data/configs/tile.yaml``). Sizes in pixels, resolutions in MPP."""

    tile_size: int = 224
    target_mpp: float = 0.5
    mpp_tolerance: float = 0.02
    tissue_mpp: float = 8.0
    tissue_threshold: float = 0.6
    tiles: int | None = None  # global budget; None takes every candidate
    seed: int = 0
    shard_size: int = 500  # tiles per shard = per write unit (~50-75 MB of PNG)
    shard_name: str = "tiles"
    resample: str = "area"
    png_encoder: str = "fpng"
    tissue: TissueParams = field(default_factory=TissueParams)
    segmenter: str = "hsv"  # hsv (the HSV rule), hest or grandqc (deep networks, cytosyn_encoders.segmenters)
    segmenter_weights: str | None = None  # the network's local weights file (hest, grandqc)
    segmenter_batch: int = 16  # patches per forward pass

    def fingerprint(self) -> dict:
        """Everything that changes the output bytes (the segmenter's weights by their digest)."""
        d = dataclasses.asdict(self)
        w = self.segmenter_weights
        if w is not None and not str(w).startswith("random"):
            d["segmenter_weights"] = {"path": str(w), **file_identity(w)}  # a changed file is a changed run
        d.pop("segmenter_batch")
        return d

    def __post_init__(self):
        self.validate("tile config")

    def validate(self, where: str) -> None:
        """Every value checked; errors name ``where`` (e.g. the config file) and the key."""
        positive(self.tile_size, f"{where}: tile_size", int)
        positive(self.target_mpp, f"{where}: target_mpp")
        fraction(self.mpp_tolerance, f"{where}: mpp_tolerance")
        positive(self.tissue_mpp, f"{where}: tissue_mpp")
        fraction(self.tissue_threshold, f"{where}: tissue_threshold", closed=True)
        if self.tiles is not None:
            positive(self.tiles, f"{where}: tiles", int)
        integer(self.seed, f"{where}: seed")
        positive(self.shard_size, f"{where}: shard_size", int)
        one_of(self.resample, f"{where}: resample", RESAMPLE_NAMES)
        one_of(self.png_encoder, f"{where}: png_encoder", ("fpng", "pillow"))
        one_of(self.segmenter, f"{where}: segmenter", SEGMENTER_NAMES)
        positive(self.segmenter_batch, f"{where}: segmenter_batch", int)
        if self.segmenter != "hsv" and not self.segmenter_weights:
            raise UsageError(f"{where}: segmenter {self.segmenter} needs segmenter_weights (--segmenter-weights FILE, "
                             "or random:small for a test network); weights are never downloaded")
        w = self.segmenter_weights
        if w is not None and not str(w).startswith("random") and not Path(w).is_file():
            raise UsageError(f"{where}: segmenter_weights: file not found: {w} (weights are never downloaded)")
        if not isinstance(self.shard_name, str) or not self.shard_name or "/" in self.shard_name:
            raise UsageError(f"{where}: shard_name must be a non-empty name without '/', got {self.shard_name!r}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "tile config") -> "TileConfig":
        d = dict(d)
        tissue = d.pop("tissue", {}) or {}
        if not isinstance(tissue, dict):
            raise UsageError(f"{where}: tissue must be a mapping, got {tissue!r}")
        known = {f.name for f in dataclasses.fields(TissueParams)}
        unknown = (set(d) - {f.name for f in dataclasses.fields(cls)}) | {f"tissue.{k}" for k in set(tissue) - known}
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
        for k, v in tissue.items():
            if k == "value_min":
                non_negative(v, f"{where}: tissue.{k}")
            else:
                positive(v, f"{where}: tissue.{k}")
        try:
            return cls(tissue=TissueParams(**tissue), **d)
        except UsageError as exc:
            raise UsageError(str(exc).replace("tile config", where, 1)) from None
