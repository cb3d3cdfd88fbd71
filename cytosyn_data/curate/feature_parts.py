"""Curation features one shard at a time: the work unit that spreads the iBOT forwards of every tile
(40M-115M at the report's size) over torchrun / accelerate ranks (shards ``i % world == rank``, each on
its own GPU) or over Dask CPU workers, and the merge of the per-shard parts into one feature file.

A part is ``curate/parts/{shard}.npy`` (float32 [n, D], the shard's PNG tiles in member order),
``{shard}.keys.parquet`` and ``{shard}.json``, the marker written last: the backbone identity and the
shard's size and mtime. A part is computed with batches that never cross its shard, so its bytes do
not depend on which rank or worker computed it, nor on the number of ranks: merged in shard order they
are the bytes one process writes. A re-run skips every part whose marker still matches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl
import torch

from cytosyn_data.core.errors import DataError
from cytosyn_data.core.executors import ClusterSpec, open_executor, rank_device
from cytosyn_data.core.pipeline import Writer, ordered_map, read_ahead
from cytosyn_data.io.atomic import atomic_write_bytes, remove_stale_tmp, tmp_path
from cytosyn_data.io.feature_file import FeatureFileWriter, read_rows
from cytosyn_data.io.png import decode_tile
from cytosyn_data.io.tar_read import stream_members
from cytosyn_data.run.state import code_version, file_identity
from cytosyn_encoders import build_encoder

__all__ = ["PartUnit", "build_backbone", "compute_parts", "image_features", "merge_parts", "part_files"]


@dataclass(frozen=True)
class PartUnit:
    """One shard's curation features to compute (a unit of the local loop, a rank or a Dask worker)."""

    shard: str
    parts: str  # the folder of the parts
    weights: str
    mean_patch: bool
    ident: str  # the backbone's identity (weights digest, mean patch)
    batch_size: int
    device: str | None
    decode_workers: int


def part_files(parts: Path, shard: str | Path) -> tuple[Path, Path, Path]:
    """(features ``.npy``, keys ``.keys.parquet``, marker ``.json``) of ``shard``'s part."""
    name = Path(shard).name
    return parts / f"{name}.npy", parts / f"{name}.keys.parquet", parts / f"{name}.json"


def _current(marker: Path, shard: str, ident: str) -> bool:
    """The part's marker names this backbone and the shard as it is now (size, mtime)."""
    if not marker.exists():
        return False
    mark = json.loads(marker.read_text())
    now = file_identity(shard)
    return mark.get("backbone") == ident and (mark.get("size"), mark.get("mtime_ns")) == (now["size"], now["mtime_ns"])


def build_backbone(weights):
    """The frozen iBOT ViT-S/16 (384-d CLS) of the encoder registry, with its normalisation; ``weights``
    is a local iBOT/DINO checkpoint (teacher, backbone prefixes and heads handled) or ``random:small``."""
    return build_encoder("ibot_vits16", weights)


@torch.no_grad()
def image_features(encoder, imgs: np.ndarray, mean_patch: bool = False, device="cpu") -> np.ndarray:
    """float32 [B, D] (or [B, 2D]) for decoded tiles uint8 [B, H, W, 3]; on CUDA through pinned memory
    with a non-blocking copy, in bf16."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.from_numpy(imgs)
    x = x.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else x.to(dev)
    x = x.permute(0, 3, 1, 2).float() / 255
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        tokens = encoder.tokens(x)
    f = tokens[:, 0]
    if mean_patch:
        f = torch.cat([f, tokens[:, encoder.network.num_prefix_tokens:].mean(1)], dim=-1)
    return f.float().cpu().numpy()


@lru_cache(maxsize=2)
def _frozen_backbone(weights: str, device: str):
    """The frozen iBOT ViT-S/16, built once per process (a Dask worker keeps it between its shards)."""
    return build_backbone(weights).to(torch.device(device))


def compute_part(unit: PartUnit) -> dict:
    """The part of ``unit.shard`` unless current: a pipeline (members read ahead, PNG decoded on
    ``decode_workers`` threads in order, the backbone, rows written behind), then keys, then the
    marker. Returns ``{"tiles", "written", "skipped"}``."""
    parts = Path(unit.parts)
    npy, keys_path, marker = part_files(parts, unit.shard)
    for p in (npy, npy.with_suffix(".raw"), keys_path, marker):  # .raw: the feature file's rows in writing
        remove_stale_tmp(parts, p.name)  # only this shard's: other ranks write the others
    if _current(marker, unit.shard, unit.ident):
        return {"tiles": 0, "written": 0, "skipped": 1}
    device = rank_device(unit.device)
    model = _frozen_backbone(unit.weights, device)
    decoded = ordered_map(lambda b: (b[0], np.stack([decode_tile(p, f"{unit.shard}: {k}") for k, p in zip(*b)])),
                          read_ahead(_png_batches(unit.shard, unit.batch_size)), unit.decode_workers)
    keys = []
    with FeatureFileWriter(npy) as fw:
        writer = Writer(fw.append)
        try:
            for batch_keys, imgs in decoded:
                writer.submit(image_features(model, imgs, unit.mean_patch, device))
                keys += batch_keys
        finally:
            writer.close()
    tmp = tmp_path(keys_path)
    pl.DataFrame({"key": keys}, schema={"key": pl.String}).write_parquet(tmp)
    tmp.replace(keys_path)
    record = {"backbone": unit.ident, **file_identity(unit.shard), "tiles": len(keys), "code_version": code_version()}
    atomic_write_bytes(marker, json.dumps(record, indent=1, sort_keys=True).encode())
    return {"tiles": len(keys), "written": 1, "skipped": 0}


def _png_batches(shard: str, batch_size: int):
    """(keys, PNG bytes) of one shard's tiles in member order, ``batch_size`` at a time."""
    keys, pngs = [], []
    for name, data in stream_members(shard):
        if name.endswith(".png"):
            keys.append(name[: -len(".png")])
            pngs.append(data)
            if len(pngs) == batch_size:
                yield keys, pngs
                keys, pngs = [], []
    if pngs:
        yield keys, pngs


def compute_parts(units: list[PartUnit], rank: int = 0, world: int = 1, cluster: ClusterSpec | None = None) -> dict:
    """This process's share of ``units`` (``i % world == rank``), or every unit on ``cluster`` (Dask CPU
    workers); returns the summed ``{"tiles", "written", "skipped"}``."""
    mine = [u for i, u in enumerate(units) if i % world == rank]
    if mine:
        Path(mine[0].parts).mkdir(parents=True, exist_ok=True)
    total = {"tiles": 0, "written": 0, "skipped": 0}
    with open_executor(cluster or ClusterSpec("local", workers=1), warm=("cytosyn_data.curate.feature_parts",)) as ex:
        for res in ex.map(compute_part, mine, "curate features"):
            total = {k: total[k] + res[k] for k in total}
    return total


def merge_parts(units: list[PartUnit], features: Path, keys_out: Path, chunk: int = 65_536) -> int:
    """The parts of ``units`` in shard order -> ``features`` (float32 [N, D] ``.npy``) and ``keys_out``
    (parquet ``key``), each written under a temporary name and renamed; a part missing or stale is a
    :class:`DataError` naming its shard. Memory: one chunk of rows. Returns N."""
    missing = [u.shard for u in units if not _current(part_files(Path(u.parts), u.shard)[2], u.shard, u.ident)]
    if missing:
        raise DataError(f"{missing[0]}: its curation features are missing or stale ({len(missing)} shard(s)); "
                        f"did a rank or worker fail? Re-run to compute them")
    n = 0
    with FeatureFileWriter(features) as fw:
        for u in units:
            x = np.load(part_files(Path(u.parts), u.shard)[0], mmap_mode="r")
            for lo in range(0, x.shape[0], chunk):
                fw.append(read_rows(x, lo, lo + chunk))
            n += x.shape[0]
    tmp = tmp_path(keys_out)
    pl.concat([pl.scan_parquet(part_files(Path(u.parts), u.shard)[1]) for u in units]).sink_parquet(tmp)
    tmp.replace(keys_out)
    return n
