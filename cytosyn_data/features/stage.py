"""`cytosyn-data features`: H0-mini CLS and 14x14 patch tokens added to every tile of the shards.

For each shard, every ``{key}.png`` gets ``{key}.cls.npy`` (float16 [768]) and
``{key}.tok.npy`` (float16 [196, 768]: the 16x16 patch tokens resized to 14x14, bicubic,
antialias). The shard is rewritten atomically (temp name, rename) with its original members
first, so training streams the features with the image. ``.features/{shard}.json`` in the shard
folder records a finished shard by content (size, mtime and sha256 of the written shard) and the
encoder's weights digest; a re-run skips a shard only when both still match. Each shard is a
work unit: several processes (``accelerate launch``/torchrun) take shards ``i % world == rank``
on GPUs (each on its own device, ``cuda:LOCAL_RANK``); a unit clears only its own shard's stale
temporaries, so no rank touches another's files; on CPUs the units can run on a Dask cluster
(``--scheduler`` / ``--cluster``).
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from cytosyn_data.core.executors import ClusterSpec, open_executor, rank_device
from cytosyn_data.io.atomic import atomic_write_bytes, remove_stale_tmp
from cytosyn_data.io.png import decode_tile
from cytosyn_data.io.remote import filesystem, is_url, list_remote, remote_identity
from cytosyn_data.io.tar_read import stream_members
from cytosyn_data.io.tar_write import TarAppender
from cytosyn_data.run.state import code_version, file_identity
from cytosyn_encoders import weights_identity
from cytosyn_encoders.h0mini import build_h0_mini, h0_mini_features
from cytosyn_encoders.weights import file_sha256

FEATURE_EXTS = ("cls.npy", "tok.npy")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@dataclass
class FeatureResult:
    shards_done: int
    shards_skipped: int
    tiles: int
    seconds: float


def _model_identity(weights) -> str:
    return f"h0-mini:{weights_identity(weights)}"


def _is_done(mark, shard: Path, ident: str) -> bool:
    """A shard is done when its marker names this encoder (weights digest) and the shard's bytes are
    those written then (size and mtime first, then the sha256 of the content)."""
    if not isinstance(mark, dict) or mark.get("model") != ident:
        return False
    now = file_identity(shard)
    if (mark.get("size"), mark.get("mtime_ns")) != (now["size"], now["mtime_ns"]):
        return False
    return mark.get("sha256") == file_sha256(shard)


@torch.no_grad()
def encode_tiles(model, pngs: list[bytes], device, batch_size: int, dtype, keys: list[str] | None = None,
                 where: str = "tiles", size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """PNG tiles (``size`` px; other modes converted, see png.decode_tile) -> (CLS float16 [N, D],
    tokens float16 [N, 196, D]); a bad tile stops with ``where`` and its key named."""
    keys = keys or [str(i) for i in range(len(pngs))]

    if not pngs:
        raise ValueError("no PNG tiles to encode")
    cls_out, tok_out = [], []
    for i in range(0, len(pngs), batch_size):
        imgs = np.stack([decode_tile(p, f"{where}: {k}", size) for k, p in zip(keys[i : i + batch_size], pngs[i : i + batch_size])])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(device).float() / 255.0
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            cls, tok = h0_mini_features(model, x)
        cls_out.append(cls.float().cpu().numpy().astype(np.float16))
        tok_out.append(tok.float().cpu().numpy().astype(np.float16))
    return np.concatenate(cls_out), np.concatenate(tok_out)


@dataclass(frozen=True)
class FeatureUnit:
    """One shard to give features (a work unit of the local loop or of a Dask cluster)."""

    shard: str
    weights: str
    ident: str
    batch_size: int
    device: str | None


def marker_path(shard: Path) -> Path:
    """``{shard folder}/.features/{shard name}.json``: one marker per shard, so units never share a file."""
    return shard.parent / ".features" / f"{shard.name}.json"


def add_features(
    shard_dir: str | Path,
    weights: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
    rank: int = 0,
    world: int = 1,
    cluster=None,
) -> FeatureResult:
    """Add H0-mini features to every shard under ``shard_dir`` (this process's share ``i % world ==
    rank``, or every shard as units on ``cluster``, a :class:`executors.ClusterSpec` for CPU workers)."""
    if is_url(shard_dir):  # s3://bucket/run/splits/train/: each shard fetched, rewritten, put back
        shards = list_remote(str(shard_dir), {".tar"})
    else:
        shard_dir = Path(shard_dir)
        shards = sorted(shard_dir.glob("*.tar"))  # stale temporaries: cleared by each shard's own unit
    if not shards:
        raise FileNotFoundError(f"{shard_dir}: no .tar shards")
    if weights is None:
        raise FileNotFoundError("H0-mini: no weights given (--h0-mini-weights: a local file, or random:small for a "
                                "random test network); weights are never downloaded")
    ident = _model_identity(weights)
    t0 = time.perf_counter()
    units = [FeatureUnit(str(s), weights, ident, batch_size, device) for i, s in enumerate(shards) if i % world == rank]
    n_tiles = skipped = finished = 0
    with open_executor(cluster or ClusterSpec("local", workers=1), warm=("cytosyn_data.features.stage",)) as ex:
        for res in ex.map(feature_shard, units, "features"):  # in this process without a cluster
            n_tiles, skipped, finished = n_tiles + res["tiles"], skipped + res["skipped"], finished + res["written"]
    return FeatureResult(finished, skipped, n_tiles, time.perf_counter() - t0)


@lru_cache(maxsize=2)
def _frozen_h0_mini(weights: str, device: str):
    """The frozen encoder, built once per process (a Dask worker keeps it between its shards)."""
    return build_h0_mini(weights).to(torch.device(device)).eval()


def feature_shard(unit: FeatureUnit) -> dict:
    """Rewrite one shard with ``{key}.cls.npy`` and ``{key}.tok.npy`` after each PNG, unless its marker
    says it already has them from this encoder; the marker is written after the shard's rename."""
    if is_url(unit.shard):
        return _feature_remote_shard(unit)
    shard = Path(unit.shard)
    mark = marker_path(shard)
    remove_stale_tmp(shard.parent, shard.name)  # only this shard's: other ranks write the others
    remove_stale_tmp(mark.parent, mark.name)
    old = json.loads(mark.read_text()) if mark.exists() else None
    if _is_done(old, shard, unit.ident):
        return {"skipped": 1, "written": 0, "tiles": 0}
    n = _rewrite_with_features(shard, unit)
    if n:
        record = {"model": unit.ident, **file_identity(shard), "sha256": file_sha256(shard), "code_version": code_version()}
        atomic_write_bytes(mark, json.dumps(record, indent=1, sort_keys=True).encode())
    return {"skipped": int(n == 0), "written": int(n > 0), "tiles": n}


def _feature_remote_shard(unit: FeatureUnit) -> dict:
    """The same for a shard at a URL: fetched to a temporary folder, rewritten, put back (one PUT:
    readers see the old or the new object); the marker ``{prefix}/.features/{name}.json`` keeps the
    object's size and ETag after the upload."""
    fs, path = filesystem(unit.shard)
    prefix, name = path.rsplit("/", 1)
    mark = f"{prefix}/.features/{name}.json"
    old = json.loads(fs.cat_file(mark)) if fs.exists(mark) else None
    if isinstance(old, dict) and old.get("model") == unit.ident and old.get("object") == remote_identity(unit.shard):
        return {"skipped": 1, "written": 0, "tiles": 0}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        fs.get_file(path, str(local))
        n = _rewrite_with_features(local, unit)
        if n:
            fs.put_file(str(local), path)
            record = {"model": unit.ident, "object": remote_identity(unit.shard), "sha256": file_sha256(local),
                      "code_version": code_version()}
            fs.pipe_file(mark, json.dumps(record, indent=1, sort_keys=True).encode())
    return {"skipped": int(n == 0), "written": int(n > 0), "tiles": n}


def _rewrite_with_features(shard: Path, unit: FeatureUnit) -> int:
    """Rewrite the local tar ``shard`` with the feature members, one batch of ``batch_size`` tiles at
    a time (memory: one batch's members and tokens, not the shard's); returns the tiles encoded
    (0: no PNG, the shard is left as it is)."""
    device = torch.device(rank_device(unit.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, pending, n_png = 0, [], 0
    with TarAppender(shard) as tar:
        for name, data in stream_members(shard):
            if name.endswith(FEATURE_EXTS):
                continue
            pending.append((name, data))
            n_png += name.endswith(".png")
            if n_png == unit.batch_size:
                n += _write_batch(tar, pending, unit, device, dtype, shard)
                pending, n_png = [], 0
        if n_png or n:
            n += _write_batch(tar, pending, unit, device, dtype, shard)
            tar.commit()
    return n


def _write_batch(tar: TarAppender, members: list, unit: FeatureUnit, device, dtype, shard: Path) -> int:
    """Append ``members``, each PNG followed by its ``{key}.cls.npy`` and ``{key}.tok.npy``."""
    keys = [n[: -len(".png")] for n, _ in members if n.endswith(".png")]
    if keys:
        model = _frozen_h0_mini(unit.weights, str(device))
        pngs = [b for n, b in members if n.endswith(".png")]
        cls, tok = encode_tiles(model, pngs, device, unit.batch_size, dtype, keys, str(shard))
        feats = dict(zip(keys, zip(cls, tok)))
    for name, data in members:  # the feature members follow each key's own members
        tar.add(name, data)
        if name.endswith(".png"):
            c, t = feats[name[: -len(".png")]]
            tar.add(f"{name[: -len('.png')]}.cls.npy", npy_bytes(c))
            tar.add(f"{name[: -len('.png')]}.tok.npy", npy_bytes(t))
    return len(keys)
