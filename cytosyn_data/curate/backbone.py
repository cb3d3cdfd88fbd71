"""Curation features: CLS (optionally with the mean patch token) of a frozen ViT-S/16 (timm
``vit_small_patch16_224``, weights from a local iBOT/DINO checkpoint) for every tile, cached in
``curate/features.npy`` + ``curate/features_keys.parquet`` with the backbone identity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from cytosyn_data.core.pipeline import Writer, ordered_map, read_ahead
from cytosyn_data.io.atomic import atomic_write_bytes
from cytosyn_data.io.feature_file import FeatureFileWriter
from cytosyn_data.io.png import decode_png
from cytosyn_data.io.tar_read import stream_members
from cytosyn_data.run.state import files_digest
from cytosyn_encoders import build_encoder, weights_identity


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


def _png_batches(urls: list[str], batch_size: int):
    """(keys, PNG bytes) of the shards' tiles in shard and member order, ``batch_size`` at a time."""
    keys, pngs = [], []
    for url in urls:
        for name, data in stream_members(url):
            if name.endswith(".png"):
                keys.append(name[: -len(".png")])
                pngs.append(data)
                if len(pngs) == batch_size:
                    yield keys, pngs
                    keys, pngs = [], []
    if pngs:
        yield keys, pngs


def compute_features(shard_dir: Path, out_dir: Path, weights=None, mean_patch=False, device=None,
                     batch_size: int = 128) -> tuple[pl.Series, np.ndarray]:
    """Keys and float32 [N, D] features (memory-mapped) of every tile in the shards (see
    :func:`feature_cache`; the keys are read into memory, ~60 bytes per tile)."""
    x = feature_cache(shard_dir, out_dir, weights, mean_patch, device, batch_size)
    return pl.read_parquet(out_dir / "features_keys.parquet")["key"], x


def feature_cache(shard_dir: Path, out_dir: Path, weights=None, mean_patch=False, device=None,
                  batch_size: int = 128, decode_workers: int = 2) -> np.ndarray:
    """float32 [N, D] features (memory-mapped) of every tile in the shards, cached in ``out_dir``
    (reused when the backbone weights and the shard files (name, size, mtime) are the same):
    ``out_dir/features.npy``, and the keys of its rows in ``out_dir/features_keys.parquet``. A
    pipeline: shards read ahead, PNG decoded on ``decode_workers`` threads (in order), the backbone,
    rows written behind; the bytes do not depend on ``decode_workers``."""
    urls = sorted(str(p) for p in Path(shard_dir).glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"{shard_dir}: no .tar shards")
    ident = f"ibot_vits16:{weights_identity(weights)}"
    ident += ("+meanpatch" if mean_patch else "") + f"+shards:{files_digest(urls)}"
    meta_path = out_dir / "features.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("backbone") == ident:
        return np.load(out_dir / "features.npy", mmap_mode="r")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_backbone(weights).to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = []
    batches = read_ahead(_png_batches(urls, batch_size))  # read ahead; decode on threads; write behind
    decoded = ordered_map(lambda b: (b[0], np.stack([decode_png(p) for p in b[1]])), batches, decode_workers)
    with FeatureFileWriter(out_dir / "features.npy") as fw, tqdm(desc="curate features", unit="tile") as bar:
        writer = Writer(fw.append)
        try:
            for batch_keys, imgs in decoded:
                writer.submit(image_features(model, imgs, mean_patch, device))
                keys.append(pl.Series(batch_keys, dtype=pl.String))
                bar.update(len(batch_keys))
        finally:
            writer.close()
    keys = pl.concat(keys) if keys else pl.Series("key", [], dtype=pl.String)
    pl.DataFrame({"key": keys}).write_parquet(out_dir / "features_keys.parquet")
    atomic_write_bytes(meta_path, json.dumps({"backbone": ident, "n": len(keys)}).encode())
    return np.load(out_dir / "features.npy", mmap_mode="r")
