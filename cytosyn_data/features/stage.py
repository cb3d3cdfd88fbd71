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

from cytosyn_data.core.executors import ClusterSpec, default_decode_workers, open_executor, rank_device
from cytosyn_data.core.pipeline import Writer, ordered_map, read_ahead
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
    model_wait: float = 0.0  # the fraction of the model's time spent waiting for decoded tiles


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
        cls, tok = encode_images(model, imgs, device, dtype)
        cls_out.append(cls)
        tok_out.append(tok)
    return np.concatenate(cls_out), np.concatenate(tok_out)


@dataclass(frozen=True)
class FeatureUnit:
    """One shard to give features (a work unit of the local loop or of a Dask cluster)."""

    shard: str
    weights: str
    ident: str
    batch_size: int
    device: str | None
    decode_workers: int = 2  # threads decoding PNG tiles while the model runs


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
    decode_workers: int | None = None,
) -> FeatureResult:
    """Add H0-mini features to every shard under ``shard_dir`` (this process's share ``i % world ==
    rank``, or every shard as units on ``cluster``, a :class:`executors.ClusterSpec` for CPU workers).
    ``decode_workers``: threads decoding PNG tiles beside the model (default: the CPUs per GPU, at most
    8; 2 without a GPU)."""
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
    workers = decode_workers or default_decode_workers()
    units = [FeatureUnit(str(s), weights, ident, batch_size, device, workers) for i, s in enumerate(shards)
             if i % world == rank]
    n_tiles = skipped = finished = 0
    busy = {"model_s": 0.0, "wait_s": 0.0}
    with open_executor(cluster or ClusterSpec("local", workers=1), warm=("cytosyn_data.features.stage",)) as ex:
        for res in ex.map(feature_shard, units, "features"):  # in this process without a cluster
            n_tiles, skipped, finished = n_tiles + res["tiles"], skipped + res["skipped"], finished + res["written"]
            for k in busy:
                busy[k] += res.get(k, 0.0)
    wait = busy["wait_s"] / max(busy["wait_s"] + busy["model_s"], 1e-9)
    return FeatureResult(finished, skipped, n_tiles, time.perf_counter() - t0, wait)


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
    stats = _rewrite_with_features(shard, unit)
    n = stats.tiles
    if n:
        record = {"model": unit.ident, **file_identity(shard), "sha256": file_sha256(shard), "code_version": code_version()}
        atomic_write_bytes(mark, json.dumps(record, indent=1, sort_keys=True).encode())
    return {"skipped": int(n == 0), "written": int(n > 0), "tiles": n, "model_s": stats.model_s, "wait_s": stats.wait_s}


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
        n = _rewrite_with_features(local, unit).tiles
        if n:
            fs.put_file(str(local), path)
            record = {"model": unit.ident, "object": remote_identity(unit.shard), "sha256": file_sha256(local),
                      "code_version": code_version()}
            fs.pipe_file(mark, json.dumps(record, indent=1, sort_keys=True).encode())
    return {"skipped": int(n == 0), "written": int(n > 0), "tiles": n}


def _rewrite_with_features(shard: Path, unit: FeatureUnit) -> "FeedStats":
    """Rewrite the local tar ``shard`` with the H0-mini feature members (see :func:`rewrite_with_features`)."""
    device = torch.device(rank_device(unit.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _frozen_h0_mini(unit.weights, str(device))
    stats = rewrite_with_features(shard, lambda imgs: encode_images(model, imgs, device, dtype), unit.batch_size,
                                  unit.decode_workers)
    return stats


@dataclass(frozen=True)
class FeedStats:
    """Tiles encoded, and seconds the model computed and waited for decoded input."""

    tiles: int
    model_s: float
    wait_s: float

    @property
    def wait_fraction(self) -> float:
        return self.wait_s / max(self.model_s + self.wait_s, 1e-9)


def member_batches(shard: Path, batch_size: int):
    """The shard's members (feature members dropped) in batches of ``batch_size`` PNG tiles, each
    tile with its other members; the last batch may hold fewer (or no) tiles."""
    pending, n_png = [], 0
    for name, data in stream_members(shard):
        if name.endswith(FEATURE_EXTS):
            continue
        pending.append((name, data))
        n_png += name.endswith(".png")
        if n_png == batch_size:
            yield pending
            pending, n_png = [], 0
    if pending:
        yield pending


def decode_batch(members: list, where: str, size: int = 224) -> np.ndarray | None:
    """uint8 [B, size, size, 3] of a batch's PNG tiles (None without any); a bad tile names its key."""
    pngs = [(n[: -len(".png")], d) for n, d in members if n.endswith(".png")]
    return np.stack([decode_tile(d, f"{where}: {k}", size) for k, d in pngs]) if pngs else None


def rewrite_with_features(shard: Path, encode, batch_size: int, workers: int = 1) -> FeedStats:
    """Rewrite the local tar ``shard`` with ``{key}.cls.npy`` and ``{key}.tok.npy`` after each PNG, as a
    pipeline: batches read ahead on a thread, decoded on ``workers`` threads (in order), encoded by
    ``encode`` (uint8 [B, H, W, 3] -> (CLS float16 [B, D], tokens float16 [B, 196, D])) here, and
    written behind on a thread, all overlapped; the bytes do not depend on ``workers``. Memory: a few
    batches. A shard without PNG is left as it is (0 tiles)."""
    n, model_s, wait_s = 0, 0.0, 0.0
    decoded = ordered_map(lambda b: (b, decode_batch(b, str(shard))), read_ahead(member_batches(shard, batch_size)),
                          workers)
    with TarAppender(shard) as tar:
        writer = Writer(lambda item: _append_batch(tar, *item))
        try:
            while True:
                t0 = time.perf_counter()
                item = next(decoded, None)
                t1 = time.perf_counter()
                if item is None:
                    break
                members, imgs = item
                feats = encode(imgs) if imgs is not None else None
                model_s, wait_s = model_s + time.perf_counter() - t1, wait_s + t1 - t0
                n += 0 if imgs is None else len(imgs)
                writer.submit((members, feats))
        finally:
            writer.close()
        if n:
            tar.commit()
    return FeedStats(n, model_s, wait_s)


@torch.no_grad()
def encode_images(model, imgs: np.ndarray, device, dtype) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [B, H, W, 3] -> (CLS float16 [B, D], tokens float16 [B, 196, D]); on CUDA the batch goes
    through pinned memory with a non-blocking copy."""
    x = torch.from_numpy(imgs)
    x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)
    x = x.permute(0, 3, 1, 2).float() / 255.0
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        cls, tok = h0_mini_features(model, x)
    return cls.float().cpu().numpy().astype(np.float16), tok.float().cpu().numpy().astype(np.float16)


def _append_batch(tar: TarAppender, members: list, feats) -> None:
    """Append ``members``, each PNG followed by its ``{key}.cls.npy`` and ``{key}.tok.npy``."""
    cls, tok = feats if feats is not None else ((), ())
    i = 0
    for name, data in members:  # the feature members follow each key's own members
        tar.add(name, data)
        if name.endswith(".png"):
            tar.add(f"{name[: -len('.png')]}.cls.npy", npy_bytes(cls[i]))
            tar.add(f"{name[: -len('.png')]}.tok.npy", npy_bytes(tok[i]))
            i += 1
