"""`cytosyn-data features`: H0-mini CLS and 14x14 patch tokens added to every tile of the shards.

For each shard, every ``{key}.png`` gets ``{key}.cls.npy`` (float16 [768]) and
``{key}.tok.npy`` (float16 [196, 768]: the 16x16 patch tokens resized to 14x14, bicubic,
antialias). The shard is rewritten atomically (temp name, rename) with its original members
first, so training streams the features with the image. ``features_done.json`` in the shard
folder records finished shards by content (size, mtime and sha256 of the written shard) and the
encoder's weights digest; a re-run skips a shard only when both still match.
Several processes (``accelerate launch``) take shards ``i % world == rank``.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cytosyn_encoders.weights import file_sha256

from .png import decode_tile
from .run_state import code_version, file_identity
from .shards import atomic_write_bytes, iter_tar_members, remove_stale_tmp, write_tar_atomic

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
    from cytosyn_encoders import weights_identity

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
    from cytosyn_encoders.h0mini import h0_mini_features

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


def add_features(
    shard_dir: str | Path,
    weights: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
    rank: int = 0,
    world: int = 1,
) -> FeatureResult:
    """Add H0-mini features to every shard under ``shard_dir`` (this process's share)."""
    from cytosyn_encoders.h0mini import build_h0_mini

    shard_dir = Path(shard_dir)
    shards = sorted(shard_dir.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{shard_dir}: no .tar shards")
    if weights is None:
        raise FileNotFoundError("H0-mini: no weights given (--h0-mini-weights: a local file, or random:small for a "
                                "random test network); weights are never downloaded")
    ident = _model_identity(weights)
    model_dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if model_dev.type == "cuda" else torch.float32
    remove_stale_tmp(shard_dir)
    done_path = shard_dir / f"features_done.rank{rank}.json" if world > 1 else shard_dir / "features_done.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    model = None
    t0 = time.perf_counter()
    n_tiles = skipped = finished = 0
    mine = [s for i, s in enumerate(shards) if i % world == rank]
    for shard in tqdm(mine, desc="features", unit="shard"):
        if _is_done(done.get(shard.name), shard, ident):
            skipped += 1
            continue
        members = [(n, b) for n, b in iter_tar_members(shard) if not n.endswith(FEATURE_EXTS)]
        keys = [n[: -len(".png")] for n, _ in members if n.endswith(".png")]
        pngs = [b for n, b in members if n.endswith(".png")]
        if not pngs:  # nothing to add (e.g. an empty split)
            skipped += 1
            continue
        if model is None:
            model = build_h0_mini(weights).to(model_dev)
        cls, tok = encode_tiles(model, pngs, model_dev, batch_size, dtype, keys, str(shard))
        feats = {k: (c, t) for k, c, t in zip(keys, cls, tok)}
        out = []
        for name, data in members:  # the feature members follow each key's own members
            out.append((name, data))
            if name.endswith(".png"):
                k = name[: -len(".png")]
                out += [(f"{k}.cls.npy", npy_bytes(feats[k][0])), (f"{k}.tok.npy", npy_bytes(feats[k][1]))]
        write_tar_atomic(shard, out)
        done[shard.name] = {"model": ident, **file_identity(shard), "sha256": file_sha256(shard), "code_version": code_version()}
        atomic_write_bytes(done_path, json.dumps(done, indent=1, sort_keys=True).encode())
        n_tiles += len(keys)
        finished += 1
    return FeatureResult(finished, skipped, n_tiles, time.perf_counter() - t0)
