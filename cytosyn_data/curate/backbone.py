"""Curation features: CLS (optionally with the mean patch token) of a frozen ViT-S/16 (timm
``vit_small_patch16_224``, weights from a local iBOT/DINO checkpoint) for every tile, cached in
``curate/features.npy`` + ``curate/features_keys.parquet`` with the backbone identity."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cytosyn_data.core.executors import ClusterSpec, default_decode_workers, rank_barrier
from cytosyn_data.curate.feature_parts import (  # noqa: F401 - the backbone's forward, re-exported
    PartUnit,
    build_backbone,
    compute_parts,
    image_features,
    merge_parts,
)
from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.run.state import files_digest
from cytosyn_encoders import weights_identity


def compute_features(shard_dir: Path, out_dir: Path, weights=None, mean_patch=False, device=None,
                     batch_size: int = 128) -> tuple[pl.Series, np.ndarray]:
    """Keys and float32 [N, D] features (memory-mapped) of every tile in the shards (see
    :func:`feature_cache`; the keys are read into memory, ~60 bytes per tile)."""
    x = feature_cache(shard_dir, out_dir, weights, mean_patch, device, batch_size)
    return pl.read_parquet(out_dir / "features_keys.parquet")["key"], x


@dataclass(frozen=True)
class CacheSpec:
    """What the curation feature cache of a shard folder is computed with."""

    weights: str | None = None
    mean_patch: bool = False
    device: str | None = None
    batch_size: int = 128
    #: PNG-decoding threads beside the backbone (None: the CPUs per GPU, at most 8; 2 on CPU); the bytes
    #: do not depend on it
    decode_workers: int | None = None


def cache_units(shard_dir: Path, out_dir: Path, spec: CacheSpec) -> tuple[list[PartUnit], str]:
    """One :class:`PartUnit` per shard (sorted by name) and the identity of the merged cache."""
    urls = sorted(str(p) for p in Path(shard_dir).glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"{shard_dir}: no .tar shards")
    backbone = f"ibot_vits16:{weights_identity(spec.weights)}" + ("+meanpatch" if spec.mean_patch else "")
    threads = spec.decode_workers or default_decode_workers()
    units = [PartUnit(u, str(out_dir / "parts"), spec.weights, spec.mean_patch, backbone, spec.batch_size,
                      spec.device, threads) for u in urls]
    return units, f"{backbone}+shards:{files_digest(urls)}"


def cached(out_dir: Path, ident: str) -> np.ndarray | None:
    """The merged cache in ``out_dir`` when it was made with ``ident``, memory-mapped; else None."""
    meta = out_dir / "features.json"
    if meta.exists() and json.loads(meta.read_text()).get("backbone") == ident:
        return np.load(out_dir / "features.npy", mmap_mode="r")
    return None


def merge_cache(units: list[PartUnit], out_dir: Path, ident: str) -> np.ndarray:
    """The parts merged in shard order into ``features.npy`` + ``features_keys.parquet``, then
    ``features.json`` (the cache is current from then on), then the parts removed."""
    n = merge_parts(units, out_dir / "features.npy", out_dir / "features_keys.parquet")
    atomic_write_bytes(out_dir / "features.json", json.dumps({"backbone": ident, "n": n}).encode())
    shutil.rmtree(out_dir / "parts", ignore_errors=True)
    return np.load(out_dir / "features.npy", mmap_mode="r")


def feature_cache(shard_dir: Path, out_dir: Path, weights=None, mean_patch=False, device=None,
                  batch_size: int = 128, decode_workers: int | None = None, cluster: ClusterSpec | None = None) -> np.ndarray:
    """float32 [N, D] features (memory-mapped) of every tile in the shards, cached in ``out_dir``
    (reused when the backbone weights and the shard files (name, size, mtime) are the same):
    ``out_dir/features.npy``, and the keys of its rows in ``out_dir/features_keys.parquet``. Computed
    shard by shard (:mod:`feature_parts`: a pipeline with PNG decoded on ``decode_workers`` threads;
    on ``cluster``, Dask CPU workers), then merged; the bytes depend on neither ``decode_workers`` nor
    the cluster. Ranks of a torchrun job use :func:`feature_cache_ranked`."""
    units, ident = cache_units(shard_dir, out_dir, CacheSpec(weights, mean_patch, device, batch_size, decode_workers))
    x = cached(out_dir, ident)
    if x is not None:
        return x
    compute_parts(units, cluster=cluster)
    return merge_cache(units, out_dir, ident)


def feature_cache_ranked(shard_dir: Path, out_dir: Path, spec: CacheSpec, rank: int, world: int) -> np.ndarray | None:
    """:func:`feature_cache` over the ranks of a torchrun / accelerate job: rank r computes the shards
    ``i % world == r`` on its own device, every rank waits for the others (a gloo barrier, across
    nodes too), then rank 0 merges and gets the features; the other ranks get None."""
    units, ident = cache_units(shard_dir, out_dir, spec)
    x = cached(out_dir, ident)
    if x is not None:  # every rank sees the same files: all return here, or none does
        return x if rank == 0 else None
    compute_parts(units, rank, world)
    rank_barrier()
    return merge_cache(units, out_dir, ident) if rank == 0 else None
